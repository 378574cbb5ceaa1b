"""The benchmarks' one timing helper: the mean wall-clock seconds of a call after a compiling call."""
import time

import jax


def seconds_per_call(fn, *args, repeats: int = 10):
  """Mean seconds of fn(*args) over `repeats` calls, after one untimed call (compilation), synchronised."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats
