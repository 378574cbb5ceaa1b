"""The persistent compilation cache: a second process loads what the first compiled; JAX's own folder wins."""
import os
import subprocess
import sys
import textwrap
import zlib

from conftest import REPO, run_main, smoke_args
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
    folder = xla_cache.enable(sys.argv[1])
    y = jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.arange(12.0).reshape(3, 4))
    print(float(y.sum()), folder, len(hits))
""")


def enable_in_a_process(folder, stderr=None, **env):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env)
  env.pop("JAX_COMPILATION_CACHE_DIR")  # the suite's own cache (conftest): this test sets its own
  if "jax_dir" in env:
    env["JAX_COMPILATION_CACHE_DIR"] = env.pop("jax_dir")
  out = subprocess.run([sys.executable, "-c", PROGRAM, folder], env=env, capture_output=True, text=True, check=False)
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
