"""What the processes of a multi-process job agree on, each a collective; in a single-process run, the plain value.

A process that met a problem alone and stopped would leave the others waiting at their next collective: here
every process raises the same one-line error (`agree`), compares what it found (`gather`), or waits for the
others (`barrier`).
"""
import jax
import numpy as np
from jax.experimental import multihost_utils

from eejax.errors import UserError


def any_process(flag: bool) -> bool:
  """True if `flag` is True on any process of the job (a stop request that all processes must agree on)."""
  return any(gather(int(flag)))


def gather(value: int) -> list[int]:
  """`value` of every process, in process order (one entry in a single-process run)."""
  if jax.process_count() == 1:
    return [int(value)]
  return [int(v) for v in multihost_utils.process_allgather(np.asarray(value, np.int64))]


def agree(problem: str | None) -> None:
  """One UserError on every process when any process has a `problem`: a process that stopped alone would leave
  the others waiting at the next collective until JAX's heartbeat ends them with a stack trace."""
  if jax.process_count() == 1:
    if problem:
      raise UserError(problem)
    return
  mine = (problem or "").encode()[:_TEXT_BYTES].ljust(_TEXT_BYTES, b"\0")
  text_PxL = multihost_utils.process_allgather(np.frombuffer(mine, np.uint8))
  texts = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in np.asarray(text_PxL)]
  if problem:
    raise UserError(problem)
  for i, text in enumerate(texts):
    if text:
      raise UserError(f"process {i} of this job: {text}")


_TEXT_BYTES = 1024


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (after process 0 changed files the others read)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
