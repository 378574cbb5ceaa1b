"""A short training job started cold, started again with the compilation cache filled, and with the cache off.

  python bench/compile_cache.py --data folder:PATH [--config configs/cifar10.py:cpu] [-- --config.x=y ...]

Runs `python -m eejax.main` three times, each in a fresh workdir, with the same arguments: (1) with an empty
cache folder (`config.compile_cache_dir`; the job compiles and fills it), (2) with the folder that (1) filled,
as a resumed or repeated job finds it, and (3) with the cache off (`--config.compile_cache_dir=`), the
baseline. Prints each job's wall-clock time, the programs in the folder, and the ratios (2)/(3) and (1)/(3).
The default job is small (600 images, one epoch, no real-inference timing), so compilation dominates, as it
does when a stopped run resumes. JAX_COMPILATION_CACHE_DIR is removed from the jobs' environment so that the
folder under test is the one used.
"""
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from eejax import cli

SMALL = ["--config.data.max_images=600", "--config.data.val_size=100", "--config.train.epochs=1",
         "--config.eval.real_inference=False"]


def timed_job(args, workdir, cache_dir):
  """Wall-clock seconds of one `eejax.main` job; exits with its last line if it fails."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  command = [sys.executable, "-m", "eejax.main", *args, f"--workdir={workdir}", f"--config.compile_cache_dir={cache_dir}"]
  start = time.perf_counter()
  out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if out.returncode:
    last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
    sys.exit(f"bench/compile_cache.py: the job failed with status {out.returncode}: {last}")
  return seconds


def main():
  parser = cli.ArgumentParser("bench/compile_cache.py", description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="data.source, e.g. folder:../shared/data/cifar10")
  parser.add_argument("--config", default="configs/cifar10.py:cpu")
  parser.add_argument("extra", nargs="*", help="config overrides after --, added to the small job's")
  args = parser.parse_args()
  os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  job = ["--config", args.config, f"--config.data.source={args.data}", *SMALL, *args.extra]
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  print(f"hardware: {platform.machine()} ({os.cpu_count()} host cores), {device.platform} {device.device_kind}; "
        f"jax {jax.__version__}")
  print(f"job: python -m eejax.main {' '.join(job)}")
  root = tempfile.mkdtemp(prefix="eejax-bench-cache-")
  try:
    cache = os.path.join(root, "xla")
    cold = timed_job(job, os.path.join(root, "cold"), cache)
    programs = len([n for n in os.listdir(cache) if n.startswith("jit_")])
    warm = timed_job(job, os.path.join(root, "warm"), cache)
    off = timed_job(job, os.path.join(root, "off"), "")
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f"cache empty (compiles, fills it with {programs} programs): {cold:.1f} s")
  print(f"cache filled (a resumed or repeated job):        {warm:.1f} s")
  print(f"cache off (the baseline):                        {off:.1f} s")
  print(f"filled / off: {warm / off:.2f}x the time; empty / off: {cold / off:.2f}x")


if __name__ == "__main__":
  main()
