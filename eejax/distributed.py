"""Joining a multi-process job on JAX's distributed runtime, with each failure as one line.

Several processes (one per host, or one per GPU) form one job: each sees every
device of the job in `jax.devices()` and runs the same program (`eejax.sharding`
builds one mesh over all of them). A job is described either by the
environment, where JAX detects it (SLURM, Open MPI, TPU pod slices:
`--config.distributed=True`), or explicitly, for everything else:

  --coordinator=HOST:PORT --num_processes=N --process_id=I   (I = 0 .. N-1)

Process 0 hosts the coordinator at HOST:PORT; the others connect to it.

JAX's runtime ends a process that cannot reach the rest of its job with a C++
abort and a stack trace, after minutes. Here a process that has not joined
within `timeout_s` (a coordinator that never answers, a process that never
starts) ends with one line and status 2; a process that loses a peer during
the run ends with one line and status 3 (`lost_peer`).
"""
import dataclasses
import os
import re
import sys
import threading

import jax
import numpy as np

from eejax.errors import UserError, first_line

LOST_PEER_EXIT = 3


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins its job; all None and from_environment False: a single-process run."""
  coordinator: str | None = None  # HOST:PORT of process 0
  num_processes: int | None = None
  process_id: int | None = None
  from_environment: bool = False  # let JAX detect the job (SLURM, Open MPI, TPU pods)
  timeout_s: int = 300  # to join the job; then one line and status 2

  @property
  def requested(self) -> bool:
    return self.from_environment or any(v is not None for v in (self.coordinator, self.num_processes,
                                                                 self.process_id))


def check(cluster: Cluster) -> None:
  """One UserError for settings that cannot form a job, before anything starts."""
  if cluster.timeout_s < 1:
    raise UserError(f"--distributed_timeout={cluster.timeout_s} must be 1 second or more")
  if cluster.num_processes is not None and cluster.num_processes < 1:
    raise UserError(f"--num_processes={cluster.num_processes} must be 1 or more")
  if cluster.process_id is not None and cluster.process_id < 0:
    raise UserError(f"--process_id={cluster.process_id} must be 0 or more")
  if None not in (cluster.num_processes, cluster.process_id) and cluster.process_id >= cluster.num_processes:
    raise UserError(f"--process_id={cluster.process_id} is out of range for --num_processes="
                    f"{cluster.num_processes}: give 0 to {cluster.num_processes - 1}, one per process")
  if cluster.coordinator is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", cluster.coordinator):
    raise UserError(f"--coordinator={cluster.coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:1234, the address of "
                    f"process 0 and a free port)")
  if not cluster.from_environment:
    missing = [f"--{name}" for name in ("coordinator", "num_processes", "process_id")
               if getattr(cluster, name) is None]
    if missing:
      raise UserError(f"a multi-process job needs --coordinator, --num_processes and --process_id (missing: "
                      f"{', '.join(missing)}); or --config.distributed=True where JAX finds the job in the "
                      f"environment (SLURM, Open MPI, TPU pods)")


def initialize(cluster: Cluster) -> None:
  """Joins the job (once per process); a single-process run does nothing."""
  if not cluster.requested or jax.distributed.is_initialized():
    return
  check(cluster)
  where = cluster.coordinator or "the coordinator JAX found in the environment"
  watchdog = threading.Timer(cluster.timeout_s, _exit_line, (2, (
      f"process {cluster.process_id if cluster.process_id is not None else '?'} could not join the job at {where} "
      f"within {cluster.timeout_s} s: start every process (ids 0 to N-1) with the same --coordinator (process 0 "
      f"hosts it; check the address, the port and the firewall), or raise --distributed_timeout"),))
  watchdog.daemon = True
  watchdog.start()
  try:
    # JAX's own limit is kept beyond ours, so that the watchdog's line comes first.
    jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                               initialization_timeout=cluster.timeout_s + 60)
  except (ValueError, TypeError, RuntimeError) as e:  # nothing detected in the environment, and the like
    raise UserError(f"cannot start the multi-process job: {str(e).rstrip('.')}. Give --coordinator, --num_processes and "
                    f"--process_id, or run under SLURM, Open MPI or on a TPU pod") from None
  finally:
    watchdog.cancel()


def any_process(flag: bool) -> bool:
  """True if `flag` is True on any process of the job (a stop request that all processes must agree on)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def gather(value: int) -> list[int]:
  """`value` of every process, in process order (one entry in a single-process run)."""
  if jax.process_count() == 1:
    return [int(value)]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return [int(v) for v in multihost_utils.process_allgather(np.asarray(value, np.int64))]


def agree(problem: str | None) -> None:
  """One UserError on every process when any process has a `problem`: a process that stopped alone would leave
  the others waiting at the next collective until JAX's heartbeat ends them with a stack trace."""
  if jax.process_count() == 1:
    if problem:
      raise UserError(problem)
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = (problem or "").encode()[:_TEXT_BYTES].ljust(_TEXT_BYTES, b"\0")
  text_PxL = multihost_utils.process_allgather(np.frombuffer(mine, np.uint8))
  texts = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in np.asarray(text_PxL)]
  if problem:
    raise UserError(problem)
  for i, text in enumerate(texts):
    if text:
      raise UserError(f"process {i} of this job: {text}")


_TEXT_BYTES = 1024


def check_shared(workdir: str) -> None:
  """One line on every process when the processes do not see one --workdir (each host its own /tmp, say): every
  process writes a file there, and each must see all of them. Nothing is left behind."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  token = int(multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(4), np.uint32)[0]))
  names = [f".job-{token}-process-{i}" for i in range(jax.process_count())]
  mine = os.path.join(workdir, names[jax.process_index()])
  os.makedirs(workdir, exist_ok=True)
  with open(mine, "w", encoding="utf-8") as f:
    f.write(f"{os.getpid()}\n")
  try:
    barrier("eejax_check_shared_workdir")
    unseen = [i for i, name in enumerate(names) if not os.path.exists(os.path.join(workdir, name))]
    agree(None if not unseen else (
        f"--workdir={workdir} is not one folder that every process shares: process {jax.process_index()} does "
        f"not see the files that process(es) {', '.join(map(str, unseen))} wrote there. Give a --workdir on a file "
        f"system that every host mounts (NFS, Lustre, a bucket): all processes save into one checkpoint"))
  finally:
    os.remove(mine)


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (after process 0 changed files the others read)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def lost_peer(error: Exception, workdir: str) -> None:
  """Ends this process with one line after a collective failed: in a multi-process job, another process died.

  Gloo (CPU) reports a dead peer at the next collective, within a second; NCCL (GPU) may wait until JAX's
  heartbeat (100 s) ends the job. The job resumes from its last checkpoint when started again.
  """
  from eejax import checkpoint  # pylint: disable=g-import-not-at-top  # checkpoint imports this module
  saved = checkpoint.steps(os.path.join(workdir, "checkpoints"))
  resume = f"it resumes from step {saved[-1]}, its last checkpoint" if saved else "no checkpoint was saved yet"
  _exit_line(LOST_PEER_EXIT, f"process {jax.process_index()} lost the rest of its job ({first_line(error, 300)}). "
                             f"Start the job "
                             f"again with the same command on every process: {resume} in {workdir}")


def _exit_line(status: int, message: str) -> None:
  """Ends this process now with one line on stderr; JAX's runtime would otherwise abort with a stack trace."""
  sys.stdout.flush()
  os.write(2, f"eejax: error: {message}\n".encode())
  os._exit(status)  # pylint: disable=protected-access
