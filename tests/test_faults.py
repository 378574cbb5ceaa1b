"""The fault suite: eejax's commands tried as a careless or hostile user would, each checked for one clean line
(`PROGRAM: error: ...` or a stop line), its exit status, no traceback, nothing lost and nothing wrong computed.

Run `pytest -s tests/test_faults.py` to see each case's command, status and last line.
"""
import hashlib
import json
import os
import socket
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, copy_run, make_tree, run_main, smoke_args
from eejax import run

NO_INFERENCE = "--config.eval.real_inference=False"


def check_clean(r, status, expected, program="eejax"):
  """Status, the expected words in the last line of stderr, and no traceback anywhere."""
  last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
  print(f"\n  exit {r.returncode}: {last[:300]}")
  assert r.returncode == status, r.stderr[-3000:]
  assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
  assert expected in last, last
  if status == 2:
    assert last.startswith(f"{program}: error: "), last


def export(workdir, out, *extra):
  return subprocess.run([sys.executable, "-m", "eejax.export", f"--workdir={workdir}", f"--out={out}",
                         "--formats=stablehlo", "--images=16", *extra], cwd=REPO, capture_output=True, text=True,
                        timeout=300, check=False)


def tree_digest(folder):
  h = hashlib.sha256()
  for dirpath, dirnames, files in os.walk(folder):
    dirnames.sort()
    for name in sorted(set(files) - {".lock"}):  # the lock file records who holds it, not the run
      with open(os.path.join(dirpath, name), "rb") as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()


def params(workdir):
  return jax.tree.leaves(jax.device_get(run.load_run(workdir).variables))


@pytest.fixture(scope="module")
def finished(smoke_master, tmp_path_factory):
  """(tree, workdir, its export's StableHLO bytes) of a finished smoke run (a copy with its own tree)."""
  root = tmp_path_factory.mktemp("faults")
  tree, workdir = copy_run(smoke_master, str(root), own_tree=True)
  out = export(workdir, root / "export")
  assert out.returncode == 0, out.stderr[-2000:]
  return tree, workdir, (root / "export" / "model.stablehlo").read_bytes()


# ---------------------------------------------------------------- settings: refused before anything is written

SETTINGS = [
    (["--config.train.batch_size=0"], "train.batch_size=0 must be a positive number"),
    (["--config.train.batch_size=-4"], "train.batch_size=-4 must be"),
    (["--config.train.epochs=-1"], "train.epochs=-1 must be 0 or more"),
    (["--config.model.width=0"], "model.width=0.0 must be a positive"),
    (["--config.checkpoint.every_steps=0"], "checkpoint.every_steps=0 must be"),
    (["--config.checkpoint.max_to_keep=0"], "checkpoint.max_to_keep=0 must be"),
    (["--config.model.exit_after=()"], "model.exit_after=() has no exit"),
    (["--config.model.name=resnet7"], "unknown"),
    (["--config.model.name=vgg16"], "model.name=vgg16 halves the image 5 times with max-pools, so it needs images of "
                                    "at least 32x32 pixels, and these are 16x16; set data.image_size=32"),
    (["--config.data.crop_pad=-1"], "data.crop_pad=-1 must be 0 (no random crop) or more pixels"),
    (["--config.data.max_images=-5"], "data.max_images=-5 must be 0 (every image) or more"),
    (["--config.train.momentum=1.5"], "train.momentum=1.5 must be at least 0 and below 1"),
    (["--config.eval.budgets=0.5,1.5"], "eval.budgets=(0.5, 1.5) must be fractions of the full network's MACs"),
    (["--config.train.epochs=abc"], "--config.train.epochs=abc"),
    (["--config.nope=1"], "bad --config override"),
    (["--config.data.source=folder:/no/such/tree"], "not found or incomplete"),
]


@pytest.mark.parametrize("extra, expected", SETTINGS)
def test_a_bad_setting_is_one_line_and_writes_nothing(tiny_tree, tmp_path, extra, expected):
  workdir = tmp_path / "w"
  check_clean(run_main(smoke_args(tiny_tree, str(workdir), "", *extra)), 2, expected)
  assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()


def test_bad_config_files_and_paths_are_one_line(tiny_tree, tmp_path):
  args = smoke_args(tiny_tree, str(tmp_path / "w"), "")
  check_clean(run_main(["--config", "configs/cifar10.py:nope", *args[2:]]), 2, "unknown preset 'nope'")
  check_clean(run_main(["--config", "configs/nope.py", *args[2:]]), 2, "--config=configs/nope.py: no such file")
  (tmp_path / "file").write_text("a file")
  check_clean(run_main(smoke_args(tiny_tree, str(tmp_path / "file"), "")), 2, "--workdir=")
  check_clean(run_main(smoke_args(tiny_tree, str(tmp_path / "w"), str(tmp_path / "file"))), 2,
              "--config.data.cache_dir=")
  assert (tmp_path / "file").read_text() == "a file"


def test_a_config_runs_from_any_folder_and_a_broken_one_is_one_line(tmp_path):
  """configs/cifar100.py (and the others built on cifar10.py) imported `configs`, found only from the repository
  root; from elsewhere the run was a ModuleNotFoundError traceback. A config file of one's own that cannot load
  names its error and line."""
  def main_from(folder, config, *extra):
    return subprocess.run([sys.executable, "-m", "eejax.main", f"--config={config}", f"--workdir={tmp_path / 'w'}",
                           *extra], cwd=folder, capture_output=True, text=True, timeout=120, check=False)
  for name in ("cifar100", "cinic10", "svhn", "tiny_imagenet"):
    check_clean(main_from(tmp_path, os.path.join(REPO, "configs", f"{name}.py"), "--config.data.source=folder:/n"),
                2, "data folder '/n' not found")
  for body, words in (("import no_such_module\n", "(ModuleNotFoundError: No module named 'no_such_module', line 1)"),
                      ("def get_config(:\n", "(SyntaxError: invalid syntax, line 1)"),
                      ("def get_config():\n  return 1 / 0\n", "(ZeroDivisionError: division by zero, line 2)")):
    (tmp_path / "mine.py").write_text(body)
    for extra in ((), ("--config.seed=1",)):  # loaded at once, or when first used
      check_clean(main_from(tmp_path, str(tmp_path / "mine.py"), *extra), 2,
                  f"--config={tmp_path / 'mine.py'}: it could not be loaded {words}")


def _mount_tmpfs(path, size, read_only=False) -> bool:
  os.makedirs(path, exist_ok=True)
  options = f"size={size}" + (",ro" if read_only else "")
  return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                        check=False).returncode == 0


def test_a_read_only_workdir_is_one_line(tiny_tree, tmp_path):
  ro = tmp_path / "ro"
  if not _mount_tmpfs(ro, "1m", read_only=True):
    if os.geteuid() == 0:
      pytest.skip("no read-only file system here: mounting a tmpfs is not permitted, and root writes anywhere")
    ro.mkdir(exist_ok=True)
    os.chmod(ro, 0o555)
  try:
    check_clean(run_main(smoke_args(tiny_tree, str(ro / "w"), "")), 2, "is not writable")
  finally:
    subprocess.run(["umount", str(ro)], capture_output=True, check=False)


# ---------------------------------------------------------------- data

def test_bad_image_files_are_left_out_with_a_warning_naming_them(tmp_path):
  tree = str(tmp_path / "tree")
  make_tree(tree, per_class=(32, 8), size=16)
  cat = tmp_path / "tree" / "train" / "cat"
  (cat / "empty.png").write_bytes(b"")
  (cat / "notes.jpg").write_text("not an image")
  (cat / "cut.png").write_bytes((cat / "0000.png").read_bytes()[:60])
  os.symlink(cat / "gone.png", cat / "dangling.png")
  r = run_main(smoke_args(tree, str(tmp_path / "w"), "", NO_INFERENCE, "--config.data.max_images=0"))
  check_clean(r, 0, "")
  assert "warning: 4 of 100 files under" in r.stderr
  for name in ("empty.png", "notes.jpg", "cut.png", "dangling.png"):
    assert name in r.stderr


def test_tree_mistakes_are_one_line(tmp_path):
  tree = tmp_path / "tree"
  make_tree(str(tree), per_class=(8, 4), size=16)
  shutil.copytree(tree / "test" / "cat", tree / "test" / "bird")
  check_clean(run_main(smoke_args(str(tree), str(tmp_path / "w"), "")), 2, "bird")
  flat = tmp_path / "flat"
  make_tree(str(flat), per_class=(8, 4), size=16)
  for cls in ("cat", "dog", "ship"):
    for path in (flat / "train" / cls).iterdir():
      path.rename(flat / "train" / f"{cls}-{path.name}")
    (flat / "train" / cls).rmdir()
  check_clean(run_main(smoke_args(str(flat), str(tmp_path / "w2"), "")), 2, "image files directly in it")


def test_a_tree_changed_with_the_same_sizes_and_times_is_decoded_again(tmp_path):
  from eejax import data  # pylint: disable=g-import-not-at-top
  tree = tmp_path / "tree"
  for split in ("train", "test"):
    for cls, value in (("a", 10), ("b", 200)):
      (tree / split / cls).mkdir(parents=True)
      for i in range(2):
        Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(tree / split / cls / f"{i}.png")
  a, b = tree / "test" / "a" / "0.png", tree / "test" / "b" / "0.png"
  assert a.stat().st_size == b.stat().st_size
  load = lambda: data.load(f"folder:{tree}", val_size=1, cache_dir=str(tmp_path / "cache"))
  assert load().test.images_NxHxWx3[:, 0, 0, 0].tolist() == [10, 10, 200, 200]
  times = [(p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (a, b)]
  data_a, data_b = a.read_bytes(), b.read_bytes()
  a.write_bytes(data_b)
  b.write_bytes(data_a)
  for p, t in zip((a, b), times):
    os.utime(p, ns=t)  # the same size and modification time as before
  assert [(p.stat().st_size, p.stat().st_mtime_ns) for p in (a, b)] == [(len(data_a), t[1]) for t in times]
  assert load().test.images_NxHxWx3[:, 0, 0, 0].tolist() == [200, 10, 10, 200]


# ---------------------------------------------------------------- a finished run

def test_rerunning_a_finished_run_retrains_nothing_and_changes_nothing(smoke_master, tmp_path):
  tree, workdir = copy_run(smoke_master, str(tmp_path))
  before = tree_digest(os.path.join(workdir, "checkpoints"))
  r = run_main(smoke_args(tree, workdir, "", NO_INFERENCE))
  check_clean(r, 0, "")
  assert f"resuming from {workdir} at step 10" in r.stdout and "step 1/" not in r.stderr
  assert tree_digest(os.path.join(workdir, "checkpoints")) == before


def test_another_model_dataset_or_recipe_is_refused_and_the_finished_run_stays_whole(finished, tmp_path):
  tree, workdir, exported = finished
  other_tree = str(tmp_path / "other")
  make_tree(other_tree, per_class=(32, 8), size=16, seed=1)
  before = tree_digest(workdir)
  params_before = params(workdir)
  for extra, words in ((["--config.model.width=0.5"], "model.width: 0.25 there, 0.5 here"),
                       (["--config.model.head=pool_conv"], 'model.head: "linear" there, "pool_conv" here'),
                       (["--config.train.init=pytorch"], 'init: "flax" there, "pytorch" here'),
                       (["--config.data.source=folder:" + other_tree], "data_fingerprint"),
                       (["--config.train.learning_rate=0.1"], "train.learning_rate: 0.05 there, 0.1 here"),
                       (["--config.train.batch_size=8", "--config.data.crop_pad=0"],
                        "data.crop_pad: 4 there, 0 here; train.batch_size: 16 there, 8 here")):
    args = smoke_args(tree, workdir, "", NO_INFERENCE, *extra)
    check_clean(run_main(args), 2, words)
    assert tree_digest(workdir) == before
  bts = run_main(["--config", "configs/cifar10.py:bts", f"--workdir={workdir}", f"--config.bts.backbone={workdir}",
                  f"--config.data.source=folder:{tree}", "--config.data.max_images=96", "--config.data.val_size=16"])
  check_clean(bts, 2, f"{workdir} holds a joint run, not a BTS-EE one. Nothing in it was changed")
  assert tree_digest(workdir) == before
  for a, b in zip(params(workdir), params_before):
    np.testing.assert_array_equal(a, b)
  out = export(workdir, tmp_path / "export")
  assert out.returncode == 0, out.stderr
  assert (tmp_path / "export" / "model.stablehlo").read_bytes() == exported


def test_damaged_or_missing_run_files_are_one_line(finished, tmp_path):
  _, workdir, _ = finished
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  with open(os.path.join(copy, "config.json"), "r+", encoding="utf-8") as f:
    f.truncate(100)
  check_clean(export(copy, tmp_path / "e1"), 2, "config.json is damaged", "eejax.export")
  shutil.rmtree(copy)
  shutil.copytree(workdir, copy)
  latest = max(int(d) for d in os.listdir(os.path.join(copy, "checkpoints")) if d.isdigit())
  shutil.rmtree(os.path.join(copy, "checkpoints", str(latest)))
  check_clean(export(copy, tmp_path / "e2"), 2, f"fitted on the model of step {latest}", "eejax.export")


def _flip_in_latest(workdir, where=0.5):
  folder = os.path.join(workdir, "checkpoints", max((d for d in os.listdir(os.path.join(workdir, "checkpoints"))
                                                     if d.isdigit()), key=int))
  files = sorted(os.path.join(d, n) for d, _, fs in os.walk(folder) for n in fs if n != "eejax.sha256.json")
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    at = int(os.path.getsize(biggest) * where)
    f.seek(at)
    byte = f.read(1)[0]
    f.seek(at)
    f.write(bytes([byte ^ 0x10]))


def test_a_flipped_bit_is_caught_on_every_path_and_training_redoes_the_step(finished, tmp_path):
  tree, workdir, _ = finished
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  _flip_in_latest(copy)
  r = export(copy, tmp_path / "e")
  check_clean(r, 2, "fitted on the model of step 10", "eejax.export")  # never the damaged weights
  assert "checkpoints/10 is damaged" in r.stdout + r.stderr
  bts = run_main(["--config", "configs/cifar10.py:bts", f"--workdir={tmp_path / 'bts'}", f"--config.bts.backbone={copy}",
                  f"--config.data.source=folder:{tree}", "--config.data.cache_dir=", "--config.data.val_size=8",
                  "--config.data.max_images=96", "--config.bts.positions=1", "--config.bts.margins=0.0",
                  "--config.bts.epochs=1", "--config.bts.batch_size=16", "--config.eval.batch_size=16"])
  check_clean(bts, 2, "has not finished training: its latest checkpoint is step 8, its report of step 10")
  assert "checkpoints/10 is damaged" in bts.stdout  # never step 8's weights as the backbone reported at step 10
  resumed = run_main(smoke_args(tree, copy, "", NO_INFERENCE))
  check_clean(resumed, 0, "")
  assert "is damaged" in resumed.stdout and "resuming from" in resumed.stdout
  for a, b in zip(params(copy), params(workdir)):  # step 10 trained again: the same weights, bit for bit
    np.testing.assert_array_equal(a, b)


def test_two_runs_at_once_in_one_workdir_the_second_is_one_line(tiny_tree, tmp_path):
  workdir = str(tmp_path / "w")
  first = subprocess.Popen([sys.executable, "-m", "eejax.main",
                            *smoke_args(tiny_tree, workdir, "", NO_INFERENCE, "--config.train.epochs=30")],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
  deadline = time.time() + 120
  while not os.path.exists(os.path.join(workdir, "identity.json")) and time.time() < deadline:
    time.sleep(0.1)
  second = run_main(smoke_args(tiny_tree, workdir, "", NO_INFERENCE, "--config.seed=1"))
  check_clean(second, 2, f"in use by another eejax job (process {first.pid} on {socket.gethostname()})")
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")
           if "train/loss" in line]
  assert steps == sorted(set(steps)) and steps[-1] == 150  # one run's curve, whole
  with open(os.path.join(workdir, "identity.json"), encoding="utf-8") as f:
    assert json.load(f)["seed"] == 0


_PROC = {}


def _maps():
  try:
    with open(f"/proc/{_PROC['pid']}/maps", encoding="utf-8") as f:
      return f.read()
  except OSError:
    return ""


def _interrupt_when(args, ready, tmp_path, module="eejax.main", sig=signal.SIGINT):
  # Ctrl-C as a terminal delivers it: a shell may start this suite with SIGINT ignored, which children inherit,
  # so the command starts through an exec that restores it (the same process id).
  restore = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
             "signal.signal(signal.SIGTERM, signal.SIG_DFL); "
             "os.execv(sys.executable, [sys.executable, '-m', sys.argv[1], *sys.argv[2:]])")
  proc = subprocess.Popen([sys.executable, "-c", restore, module, *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=open(tmp_path / "err.txt", "w", encoding="utf-8"), text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
  _PROC["pid"] = proc.pid
  deadline = time.time() + 120
  while not ready((tmp_path / "err.txt").read_text()) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  return subprocess.CompletedProcess(args, proc.returncode, out, (tmp_path / "err.txt").read_text())


def test_ctrl_c_in_start_up_or_evaluation_is_one_line_and_the_run_goes_on(tiny_tree, tmp_path):
  workdir = str(tmp_path / "w")
  args = smoke_args(tiny_tree, workdir, "", NO_INFERENCE)
  r = _interrupt_when(args, lambda err: "jaxlib" in _maps(), tmp_path)  # importing jax: start-up
  check_clean(r, 130, "interrupted (Ctrl-C)")
  # Evaluating: once the test split is scored, the report (thresholds, certification, figures) takes seconds more;
  # 0.5 s after the last step's line was too late on a fast run (the job had ended with status 0).
  r = _interrupt_when(args, lambda err: "evaluating the test split" in err, tmp_path)
  check_clean(r, 130, "interrupted (Ctrl-C)")
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "10"))
  again = run_main(args)
  check_clean(again, 0, "")
  assert "resuming from" in again.stdout and os.path.exists(os.path.join(workdir, "report.md"))


def test_sigterm_outside_training_is_one_line_and_the_run_goes_on(tiny_tree, tmp_path):
  """SIGTERM (a scheduler's, `timeout`'s) while JAX loads or the report is written ended the job without a word."""
  workdir = str(tmp_path / "w")
  args = smoke_args(tiny_tree, workdir, "", NO_INFERENCE)
  for ready in (lambda err: "jaxlib" in _maps(), lambda err: "evaluating the test split" in err):
    r = _interrupt_when(args, ready, tmp_path, sig=signal.SIGTERM)
    check_clean(r, 143, "stopped by SIGTERM; every checkpoint and file already written stays whole")
  r = _interrupt_when([f"--workdir={workdir}", f"--out={tmp_path / 'e'}"], lambda err: "jaxlib" in _maps(),
                      tmp_path, "eejax.export", signal.SIGTERM)
  check_clean(r, 143, "eejax.export: stopped by SIGTERM")
  again = run_main(args)
  check_clean(again, 0, "")
  assert "resuming from" in again.stdout and os.path.exists(os.path.join(workdir, "report.md"))


def test_ctrl_c_while_export_or_certify_loads_jax_is_one_line(finished, tmp_path):
  _, workdir, _ = finished
  before = tree_digest(workdir)
  for module, args in (("eejax.export", [f"--workdir={workdir}", f"--out={tmp_path / 'e'}", "--formats=stablehlo"]),
                       ("eejax.certify", [f"--workdir={workdir}"])):
    r = _interrupt_when(args, lambda err: "jaxlib" in _maps(), tmp_path, module)
    check_clean(r, 130, "interrupted (Ctrl-C)")
    assert r.stderr.strip().splitlines()[-1].startswith(f"{module}: interrupted"), r.stderr
  assert not os.path.exists(tmp_path / "e") and tree_digest(workdir) == before


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes_once_freed(tiny_tree, tmp_path):
  disk = tmp_path / "disk"
  if not _mount_tmpfs(disk, "4m"):
    pytest.skip("mounting a tmpfs is not permitted here (the simulated ENOSPC is in tests/test_checkpoint.py)")
  try:
    workdir = str(disk / "w")
    args = smoke_args(tiny_tree, workdir, "", NO_INFERENCE, "--config.log.tensorboard=False")
    check_clean(run_main([*args, "--config.train.epochs=1"]), 0, "")  # checkpoints 4 and 5
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:  # leaves 48 KiB: the metrics fit, a checkpoint does not
      f.write(b"\0" * (st.f_bavail * st.f_frsize - 48 * 1024))
    r = run_main(args)
    check_clean(r, 2, "the last good checkpoint is step 5")
    assert "No space left on device" in r.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "5"]  # nothing half-written
    assert run.load_run(workdir).step == 5
    os.remove(disk / "filler")
    again = run_main(args)
    check_clean(again, 0, "")
    assert f"resuming from {workdir} at step 5" in again.stdout
  finally:
    subprocess.run(["umount", str(disk)], capture_output=True, check=False)
