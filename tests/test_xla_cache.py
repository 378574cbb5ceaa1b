"""The persistent compilation cache: a second process loads what the first compiled; JAX's own folder wins."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zlib

from conftest import REPO, copy_run, run_main, smoke_args
from eejax import xla_cache

# A fresh process that enables the cache in FOLDER, compiles one function and prints its result, the folder in
# use and how many programs JAX loaded from the cache (jax.monitoring's cache-hit event).
PROGRAM = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from eejax import xla_cache
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()  # compiled before: enable() must still count
    folder = xla_cache.enable(sys.argv[1], *map(float, sys.argv[2:]))
    y = jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.arange(12.0).reshape(3, 4))
    print(float(y.sum()), folder, len(hits))
""")


def enable_in_a_process(folder, stderr=None, max_gb=None, **env):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env)
  env.pop("JAX_COMPILATION_CACHE_DIR")  # the suite's own cache (conftest): this test sets its own
  if "jax_dir" in env:
    env["JAX_COMPILATION_CACHE_DIR"] = env.pop("jax_dir")
  limit = [] if max_gb is None else [str(max_gb)]
  out = subprocess.run([sys.executable, "-c", PROGRAM, folder, *limit], env=env, capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  if stderr is not None:
    stderr.append(out.stderr)
  value, used, hits = out.stdout.split()
  return float(value), used, int(hits)


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  folder = str(tmp_path / "xla")
  value, used, hits = enable_in_a_process(folder)
  assert used == folder and hits == 0
  written = sorted(os.listdir(folder))
  assert any(name.startswith("jit_") for name in written), written
  again, used, hits = enable_in_a_process(folder)
  assert again == value and used == folder and hits >= 1
  assert sorted(os.listdir(folder)) == written


def test_jaxs_own_folder_wins_and_an_empty_path_is_off(tmp_path):
  theirs, ours = str(tmp_path / "theirs"), str(tmp_path / "ours")
  _, used, _ = enable_in_a_process(ours, jax_dir=theirs)
  assert used == theirs and os.listdir(theirs) and not os.path.exists(ours)
  _, used, _ = enable_in_a_process("")
  assert used == "None"


def test_a_training_job_fills_the_configured_folder(tiny_tree, tmp_path):
  folder = tmp_path / "xla"
  out = run_main(smoke_args(tiny_tree, str(tmp_path / "w"), str(tmp_path / "c"),
                            f"--config.compile_cache_dir={folder}"), env_extra={"JAX_COMPILATION_CACHE_DIR": ""})
  assert out.returncode == 0, out.stderr[-2000:]
  assert any(name.startswith("jit_chunk") for name in os.listdir(folder)), os.listdir(folder)


def test_a_compile_cache_that_cannot_be_written_is_one_line(tiny_tree, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  out = run_main(smoke_args(tiny_tree, str(tmp_path / "w"), str(tmp_path / "c"),
                            f"--config.compile_cache_dir={blocker}/xla"), env_extra={"JAX_COMPILATION_CACHE_DIR": ""})
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(f"eejax: error: --config.compile_cache_dir={blocker}/xla: ")
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_an_entry_cut_short_is_one_line_and_written_anew(tmp_path):
  # JAX writes an entry in place: a full disk or a killed process leaves half a file, which JAX alone would fail
  # to read on every later job (a warning each time) and never write again.
  folder = str(tmp_path / "xla")
  value, _, _ = enable_in_a_process(folder)
  name = next(n for n in os.listdir(folder) if n.startswith("jit_"))
  path = os.path.join(folder, name)
  data = open(path, "rb").read()
  assert xla_cache.whole(data) and not xla_cache.whole(data[:len(data) // 2])
  open(path, "wb").write(data[:len(data) // 2])
  stderr = []
  again, _, _ = enable_in_a_process(folder, stderr=stderr)
  lines = [line for line in stderr[0].splitlines() if "compile" in line.lower()]
  assert again == value and len(lines) == 1, stderr[0]
  assert lines[0].startswith(f"warning: the compile cache {folder} could not read the compiled program ")
  assert "1 file(s) removed" in lines[0] and "UserWarning" not in stderr[0]
  assert xla_cache.whole(open(path, "rb").read())  # saved anew, whole
  assert enable_in_a_process(folder, stderr=stderr)[2] >= 1 and "warning" not in stderr[1]


def test_only_the_damaged_entries_of_a_program_are_removed(tmp_path):
  payload = zlib.compress(b"an executable" * 100)
  keys = [f"{i:064x}" for i in range(3)]
  for key, data in zip(keys, (payload, payload[:20], payload)):
    (tmp_path / f"jit_step-{key}-cache").write_bytes(data)
  (tmp_path / f"jit_step_two-{keys[1]}-cache").write_bytes(b"not zlib")  # another program: left alone
  assert xla_cache.remove_entries(str(tmp_path), "jit_step") == 1
  assert sorted(os.listdir(tmp_path)) == sorted([f"jit_step-{keys[0]}-cache", f"jit_step-{keys[2]}-cache",
                                                 f"jit_step_two-{keys[1]}-cache"])
  assert xla_cache.remove_entries(str(tmp_path), "jit_step", all_if_whole=False) == 0  # after a failed write
  assert xla_cache.remove_entries(str(tmp_path), "jit_step") == 2  # all whole: JAX could not use them anyway
  assert os.listdir(tmp_path) == [f"jit_step_two-{keys[1]}-cache"]


def touch(path, size, used):
  """A file of `size` bytes last used (read and written) at time `used`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"x" * size)
  os.utime(path, (used, used))


def test_prune_removes_the_files_used_longest_ago_and_never_a_lock(tmp_path):
  folder = str(tmp_path / "xla")
  touch(os.path.join(folder, "jit_a-cache"), 100, 1000)
  touch(os.path.join(folder, "jit_b-cache"), 100, 2000)
  touch(os.path.join(folder, "autotune", "c"), 100, 3000)  # XLA's autotuning results, in a subfolder
  touch(os.path.join(folder, ".lockfile"), 1000, 10)  # hidden: neither counted nor removed
  path_d = os.path.join(folder, "jit_d-cache")
  touch(path_d, 100, 500)
  os.utime(path_d, (4000, 500))  # written long ago, read lately: used lately
  assert xla_cache.prune(folder, 250) == (2, 200)  # 400 bytes: a (1000) and b (2000) go, d (read at 4000) stays
  assert sorted(os.listdir(folder)) == [".lockfile", "autotune", "jit_d-cache"]
  assert xla_cache.prune(folder, 200) == (0, 0)  # already within
  assert xla_cache.prune(folder, 0) == (2, 200)
  assert sorted(os.listdir(folder)) == [".lockfile", "autotune"]
  assert xla_cache.prune(str(tmp_path / "none"), 0) == (0, 0)


def test_a_job_first_trims_the_folder_to_its_limit_and_says_so(tmp_path):
  folder = str(tmp_path / "xla")
  touch(os.path.join(folder, "jit_old-" + "0" * 64 + "-cache"), 3 * 2**20, 1000)
  stderr = []
  enable_in_a_process(folder, stderr=stderr, max_gb=0.002)  # about 2.1 MB
  lines = [line for line in stderr[0].splitlines() if "compile cache" in line]
  assert lines == [f"compile cache {folder}: the 1 file(s) used longest ago removed (3.0 MB), to keep it under "
                   f"config.compile_cache_max_gb=0.002"], stderr[0]
  names = os.listdir(folder)
  assert not any(name.startswith("jit_old") for name in names) and any(name.startswith("jit_") for name in names)
  enable_in_a_process(folder, stderr=stderr, max_gb=0.002)  # within the limit now: nothing removed, nothing said
  assert "compile cache" not in stderr[1] and sorted(os.listdir(folder)) == sorted(names)


def test_export_and_certify_use_the_runs_compile_cache_where_it_can_be_written(smoke_master, tmp_path):
  _, workdir = copy_run(smoke_master, str(tmp_path))
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the suite's own cache
  env["HOME"] = str(tmp_path / "home")  # where `~` of the default folder is

  def set_folder(folder):
    path = os.path.join(workdir, "config.json")
    config = json.load(open(path))
    config.pop("compile_cache_dir", None)
    if folder is not None:
      config["compile_cache_dir"] = folder
    json.dump(config, open(path, "w"))

  def run(module, *args):
    out = subprocess.run([sys.executable, "-m", module, f"--workdir={workdir}", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, check=False, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out

  folder = tmp_path / "xla"
  set_folder(str(folder))
  run("eejax.certify")
  certified = set(os.listdir(folder))
  assert any(name.startswith("jit_") for name in certified), certified
  run("eejax.export", f"--out={tmp_path / 'e'}", "--formats=stablehlo", "--images=2")
  assert set(os.listdir(folder)) > certified
  set_folder(None)  # a run saved before runs had the key: the default folder
  run("eejax.certify")
  assert os.listdir(tmp_path / "home" / ".cache" / "eejax" / "xla")
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  set_folder(f"{blocker}/xla")  # cannot be written: no cache, not a word about it
  out = run("eejax.certify")
  assert "compile" not in out.stderr.lower() and "warning" not in out.stderr.lower(), out.stderr
  shutil.rmtree(folder)
  set_folder("")  # off
  run("eejax.certify")
  assert not folder.exists()


def test_the_cache_is_off_only_where_cached_collectives_hang():
  hang = xla_cache.cached_collectives_hang
  assert hang("0.12.1", "cpu", 2) and hang("0.12.1", "cpu", 3) and hang("0.13.0", "cpu", 2)
  assert hang("0.12.1.dev20261201", "cpu", 2)
  assert not hang("0.12.0.1", "cpu", 2) and not hang("0.12.0", "cpu", 2) and not hang("0.10.2", "cpu", 2)
  assert not hang("0.12.1", "cpu", 1)  # one process: no collective across processes
  assert not hang("0.12.1", "gpu", 2) and not hang("0.12.1", "tpu", 4)


def test_a_job_with_jaxs_cache_switched_off_leaves_the_folder_alone(tmp_path):
  """`enable` after JAX's cache was switched off (as `off_where_loads_hang` does) uses no folder and writes none."""
  folder = str(tmp_path / "c")
  program = ("import sys, jax; jax.config.update('jax_enable_compilation_cache', False); "
             "from eejax import xla_cache; print(xla_cache.enable(sys.argv[1])); "
             "jax.jit(lambda x: x + 1)(1.0).block_until_ready()")
  r = subprocess.run([sys.executable, "-c", program, folder], capture_output=True, text=True, check=False,
                     env={**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
                          "PYTHONPATH": REPO}, timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr[-2000:]
  assert not os.path.exists(folder) or os.listdir(folder) == []
