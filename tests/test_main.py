"""The command line: mistakes end in one clear line (status 2), never a traceback."""
import os
import time

import pytest

from conftest import run_main, smoke_args


def assert_one_line_error(out, *fragments):
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("eejax: error: "), last
  for fragment in fragments:
    assert fragment in last, (fragment, last)


@pytest.mark.parametrize("override,fragments", [
    ("--config.model.nmae=resnet8", ("bad --config override", "Did you mean \"name\"")),
    ("--config.model.name=resnet19", ("unknown model 'resnet19'; valid:", "resnet18")),
    ("--config.model.head=mpl", ("unknown model.head 'mpl'; valid: conv1d, erde, linear, mlp, pool_conv, preact",)),
    ("--config.train.epochs=many", ("--config.train.epochs=many",)),
])
def test_config_mistakes(tiny_tree, tmp_path, override, fragments):
  out = run_main(smoke_args(tiny_tree, str(tmp_path / "w"), str(tmp_path / "c"), override))
  assert_one_line_error(out, *fragments)


def test_name_mistakes_come_before_loading_data(tmp_path):
  out = run_main(["--config", "configs/cifar10.py:smoke", f"--workdir={tmp_path / 'w'}",
                  f"--config.data.source=folder:{tmp_path / 'absent'}", "--config.model.name=resnet19"])
  assert_one_line_error(out, "unknown model 'resnet19'")
  out = run_main(["--config", "configs/cifar10.py:smoke", f"--workdir={tmp_path / 'w'}", "--config.scheme=distill"])
  assert_one_line_error(out, "unknown scheme 'distill'; valid: boosted, byot, erde, ic_only, joint, mate, sdn")
  out = run_main(["--config", "configs/cifar10.py:smoke", f"--workdir={tmp_path / 'w'}", "--config.data.source=cifar11"])
  assert_one_line_error(out, "data.source='cifar11': expected one of cifar10, cifar100, svhn")


def test_missing_data_folder(tmp_path):
  out = run_main(smoke_args(str(tmp_path / "absent"), str(tmp_path / "w"), str(tmp_path / "c")))
  assert_one_line_error(out, "not found or incomplete", "folder:PATH or tfds:NAME")


def test_tfds_dataset_not_on_disk_fails_fast(tmp_path):
  start = time.perf_counter()
  out = run_main(["--config", "configs/cifar10.py:smoke", f"--workdir={tmp_path / 'w'}",
                  "--config.data.source=tfds:cifar10", f"--config.data.tfds_data_dir={tmp_path}",
                  "--config.data.download=True", "--config.data.cache_dir="])
  assert_one_line_error(out, "tfds dataset 'cifar10'", "folder:PATH")
  assert time.perf_counter() - start < 60


def test_the_default_dataset_without_network_is_one_line_with_both_remedies(tmp_path):
  from http_server import closed_port_url  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  out = run_main(["--config", "configs/cifar10.py:smoke", f"--workdir={tmp_path / 'w'}",
                  f"--config.data.mirror={closed_port_url()}", f"--config.data.cache_dir={tmp_path / 'c'}"])
  assert_one_line_error(out, "could not download", "no connection", "--config.data.source=cifar10:/path/to/",
                        "--config.data.source=folder:PATH")
  assert time.perf_counter() - start < 30  # the interpreter and jax start included; the network part is < 5 s
  assert [n for n in os.listdir(tmp_path / "c" / "downloads") if not n.endswith(".lock")] == []


def test_corrupt_checkpoint_is_reported_and_kept(tiny_tree, tmp_path):
  workdir, cache = str(tmp_path / "w"), str(tmp_path / "c")
  assert run_main(smoke_args(tiny_tree, workdir, cache, "--config.train.epochs=1")).returncode == 0
  ckpt = os.path.join(workdir, "checkpoints")
  steps = sorted((d for d in os.listdir(ckpt) if d.isdigit()), key=int)

  def garble(step):
    for dirpath, _, files in os.walk(os.path.join(ckpt, step)):
      for name in files:
        with open(os.path.join(dirpath, name), "wb") as f:
          f.write(b"garbage")
  garble(steps[-1])  # the newest: set aside with a line, the one before resumes
  out = run_main(smoke_args(tiny_tree, workdir, cache, "--config.train.epochs=2"))
  assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert f"checkpoints/{steps[-1]} is damaged" in out.stdout and f"at step {steps[-2]}" in out.stdout
  assert os.listdir(os.path.join(workdir, "damaged-checkpoints"))[0].startswith(f"{steps[-1]}-")  # kept
  for step in os.listdir(ckpt):
    if step.isdigit():
      garble(step)  # every one: one line, nothing deleted
  kept = sorted(os.listdir(ckpt))
  out = run_main(smoke_args(tiny_tree, workdir, cache, "--config.train.epochs=3"))
  assert_one_line_error(out, "every checkpoint in", "is damaged")
  assert sorted(os.listdir(ckpt)) == kept


