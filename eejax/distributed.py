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
the run ends with one line and status 3 (`lost_peer`): at its next collective
where the collectives notice (Gloo on CPU), and otherwise once the peer has
been silent for `--peer_timeout` seconds (`watch_peers`).
"""
import contextlib
import dataclasses
import os
import re
import sys
import threading
import time

import jax

from eejax import checkpoint, writers
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
  peer_timeout_s: int = 60  # a peer silent this long ends the job with one line and status 3 (`watch_peers`)

  @property
  def requested(self) -> bool:
    return self.from_environment or any(v is not None for v in (self.coordinator, self.num_processes,
                                                                 self.process_id))


def check(cluster: Cluster) -> None:
  """One UserError for settings that cannot form a job, before anything starts."""
  if cluster.timeout_s < 1:
    raise UserError(f"--distributed_timeout={cluster.timeout_s} must be 1 second or more")
  if cluster.peer_timeout_s < 5:
    raise UserError(f"--peer_timeout={cluster.peer_timeout_s} must be 5 seconds or more")
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
  _JOB["peer_timeout_s"] = cluster.peer_timeout_s
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


_JOB = {"peer_timeout_s": Cluster.peer_timeout_s, "watches": 0}  # the job this process joined


@contextlib.contextmanager
def watch_peers(workdir: str, every_s: float = 2.0):
  """While the block runs, a thread posts this process's heartbeat to the job's key-value store every `every_s`
  and reads the others'. This process ends with one line and status 3, wherever it waits (a collective that
  would never return: NCCL does not notice a dead peer; a checkpoint's barrier; the evaluation), when a peer
  - was silent for `--peer_timeout` seconds (killed, stopped, hung, its host lost), or
  - left the block with an error of its own (a dataset missing on its host, say) `ENDED_GRACE_S` ago, time
    enough for this process to end with the same error where every process met it.
  A process that leaves the block normally says so, and is no longer watched."""
  if jax.process_count() == 1:
    yield
    return
  client = _client()
  _JOB["watches"] += 1  # every process calls this in the same order: the keys of one watch match
  me, stop = jax.process_index(), threading.Event()

  def watch():
    heard = {j: (None, time.monotonic()) for j in range(jax.process_count()) if j != me}  # value, since when
    beat = 0
    while not stop.wait(every_s if beat else 0):
      beat += 1
      try:
        client.key_value_set(_key(me), str(beat), allow_overwrite=True)
        values = {j: _try_get(client, _key(j)) for j in heard}
      except Exception as e:  # pylint: disable=broad-except  # the coordinator (process 0) is gone
        values = e
      if stop.is_set():
        return
      if isinstance(values, Exception):
        lost_peer(values, workdir)
      now = time.monotonic()
      for j, value in values.items():
        if value == "done":
          del heard[j]
        elif value != heard[j][0]:
          heard[j] = (value, now)
      why = _lost(heard, now, _JOB["peer_timeout_s"])
      if why:
        lost_peer(RuntimeError(why), workdir)

  thread = threading.Thread(target=watch, name="eejax-watch-peers", daemon=True)
  thread.start()
  try:
    yield
  except BaseException as e:
    stop.set()
    _post(f"{_ENDED}{e.__class__.__name__}: {first_line(e, 300)}")
    raise
  stop.set()
  thread.join(timeout=every_s + 10)
  client.key_value_set(_key(me), "done", allow_overwrite=True)


_ENDED = "ended: "
ENDED_GRACE_S = 5.0


def _lost(heard: dict, now: float, timeout_s: float) -> str | None:
  """Why this process must end, from {peer: (last value, when it changed)}; None while every peer is well."""
  for j, (value, since) in heard.items():
    if _ending(j, value) and now - since > ENDED_GRACE_S:
      return _ending(j, value)
  silent = [j for j, (_, since) in heard.items() if now - since > timeout_s]
  if silent:
    who = f"process {silent[0]} has" if len(silent) == 1 else f"processes {', '.join(map(str, silent))} have"
    return f"{who} not been heard from for {timeout_s} s: killed, stopped, hung or its host lost"
  return None


def _peer_ending() -> RuntimeError | None:
  """The error another process posted as it ended (`watch_peers`), if any can be read."""
  with contextlib.suppress(Exception):
    client = _client()
    for j in range(jax.process_count()):
      why = _ending(j, _try_get(client, _key(j))) if j != jax.process_index() else None
      if why:
        return RuntimeError(why)
  return None


def wait_for_peers(timeout_s: float = 10.0) -> None:
  """On process 0, which hosts the job, as it ends with an error: waits (at most `timeout_s`) until every other
  process has posted that it ended too. A process still talking to the job when process 0 goes is aborted by
  JAX's runtime with a stack trace, even one that is a moment from ending with its own line."""
  if jax.process_count() == 1 or jax.process_index() != 0 or not _JOB["watches"]:
    return
  deadline, waiting = time.monotonic() + timeout_s, set(range(1, jax.process_count()))
  with contextlib.suppress(Exception):
    while waiting and time.monotonic() < deadline:
      waiting = {j for j in waiting if not _ending(j, _try_get(_client(), _key(j)))}
      time.sleep(0.05)


def _post(value: str, wait_s: float = 1.0) -> None:
  """Posts this process's `value` in the current watch, waiting at most `wait_s` (process 0 may be gone)."""
  def post():
    with contextlib.suppress(Exception):
      _client().key_value_set(_key(jax.process_index()), value, allow_overwrite=True)
  thread = threading.Thread(target=post, daemon=True)
  thread.start()
  thread.join(wait_s)


def _client():
  """The job's key-value store (JAX's distributed runtime client, the handle orbax's multihost utilities use)."""
  return jax._src.distributed.global_state.client  # pylint: disable=protected-access


def _key(j: int) -> str:
  """Where process j posts in the job's key-value store during the current watch."""
  return f"eejax/watch{_JOB['watches']}/process{j}"


def _ending(j: int, value: str | None) -> str | None:
  """What process j posted as it ended with an error, or None."""
  return f"process {j} ended with {value[len(_ENDED):]}" if value and value.startswith(_ENDED) else None


def _try_get(client, key: str) -> str | None:
  """The value at `key`, or None when nothing was posted there yet."""
  try:
    return client.key_value_try_get(key)
  except Exception as e:  # pylint: disable=broad-except  # JAX raises its runtime error for a missing key
    if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
      return None
    raise


def lost_peer(error: Exception, workdir: str) -> None:
  """Ends this process with one line after a collective failed: in a multi-process job, another process died.

  Gloo (CPU) reports a dead peer at the next collective, within a second; NCCL (GPU) may wait until JAX's
  heartbeat (100 s) ends the job. The job resumes from its last checkpoint when started again.
  """
  error = _peer_ending() or error  # what the peer said as it ended says more than the collective that failed
  if _JOB["watches"]:
    _post(f"{_ENDED}lost the rest of the job")  # process 0 need not wait for this one (`wait_for_peers`)
  saved = checkpoint.steps(os.path.join(workdir, "checkpoints"))
  resume = f"it resumes from step {saved[-1]}, its last checkpoint" if saved else "no checkpoint was saved yet"
  _exit_line(LOST_PEER_EXIT, f"process {jax.process_index()} lost the rest of its job ({first_line(error, 300)}). "
                             f"Start the job "
                             f"again with the same command on every process: {resume} in {workdir}")


def _exit_line(status: int, message: str) -> None:
  """Ends this process now with one line on stderr; JAX's runtime would otherwise abort with a stack trace."""
  sys.stdout.flush()
  os.write(2, f"eejax: error: {message}\n".encode())
  writers.close_all()  # the metrics written so far reach the disk: os._exit runs no finally block
  os._exit(status)  # pylint: disable=protected-access
