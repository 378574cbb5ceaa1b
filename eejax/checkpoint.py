"""Checkpoints (one orbax CheckpointManager per workdir), verified on every restore.

Every saved step carries `eejax.sha256.json`: the SHA-256 of each file orbax
wrote. A restore checks them first; a step whose files differ (one flipped
bit is enough) is skipped with a line saying so, and the step before it is
tried. Training sets a damaged step aside (WORKDIR/damaged-checkpoints/) so it
can train past it again; readers (export, `load_run`) only skip it. A step
written before checksums existed is restored as it is.

A save that fails (a full disk, a read-only file system) leaves no half-written
step behind and ends in one line; the steps saved before it stay whole.
Stopping cleanly on a signal is `eejax.signals`.
"""
import contextlib
import functools
import hashlib
import json
import logging as std_logging
import os
import shutil
import sys
import threading
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from eejax import collectives, workdirs
from eejax.errors import UserError, first_line
from eejax.writers import on_main_process, say

CHECKSUMS = "eejax.sha256.json"
OS_WORDS = ("No space left on device", "Read-only file system", "Permission denied", "Disk quota exceeded")


@contextlib.contextmanager
def _quiet():
  """Orbax logs a damaged step's metadata and a failed write's tracebacks itself; eejax says it in one line."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  with _quiet():
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves `state` (a pytree) at `step`, waits until it is on disk, then writes its checksums."""
  folder = os.path.join(str(mngr.directory), str(step))
  started = set(threading.enumerate())
  with _quiet():
    try:
      with _stray_writes_dropped():
        _save(mngr, step, state, folder)
    except UserError:
      _wind_down(started)
      raise


@contextlib.contextmanager
def _stray_writes_dropped():
  """What the writes of a failed save say as they end, after the save has failed, is dropped: with
  orbax-checkpoint 0.12, each write still in flight when the save's event loop closed ends in an unraisable
  `RuntimeError: Event loop is closed` (a traceback each, before eejax's one line), and each failed write that
  nobody awaited is logged by asyncio as the process exits ("Task exception was never retrieved", or Future's,
  or _GatheringFuture's), after it.
  The hook is undone after a save that succeeds; after one that fails it stays, since the writes end later."""
  previous = sys.unraisablehook
  if getattr(previous, "func", None) is not _unraisable_unless_closed_loop:  # not already there from a failed save
    sys.unraisablehook = functools.partial(_unraisable_unless_closed_loop, previous)
  hook = sys.unraisablehook
  try:
    yield
  except BaseException:
    asyncio_logger = std_logging.getLogger("asyncio")
    if _unretrieved_failed_write not in asyncio_logger.filters:
      asyncio_logger.addFilter(_unretrieved_failed_write)
    raise
  if sys.unraisablehook is hook:  # (unless the caller set another meanwhile)
    sys.unraisablehook = previous


def _unraisable_unless_closed_loop(previous, unraisable) -> None:
  e = unraisable.exc_value
  if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
    previous(unraisable)


def _unretrieved_failed_write(record: std_logging.LogRecord) -> bool:
  """False (drop it) for asyncio's line on a task whose failed write, an OS error, nobody awaited."""
  e = record.exc_info[1] if record.exc_info else None
  first = str(record.msg).split("\n", 1)[0]
  return not (first.endswith(" exception was never retrieved") and e is not None and _is_os_error(e))


def _wind_down(started: set, timeout_s: float = 10.0) -> None:
  """Waits (at most `timeout_s` in all) for the threads of orbax's that a failed save started: they end, and log
  the write they were part of, while orbax is still quiet, not after eejax's one line as the process exits."""
  deadline = time.monotonic() + timeout_s
  for thread in set(threading.enumerate()) - started:
    if type(thread).__module__.startswith("orbax."):
      thread.join(max(0.0, deadline - time.monotonic()))


def _save(mngr, step: int, state, folder: str) -> None:
  try:
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()
    if on_main_process():
      workdirs.write_json(os.path.join(folder, CHECKSUMS), digest(folder), indent=0)
  except Exception as e:  # orbax and tensorstore wrap OS errors in many types
    if not _is_os_error(e):
      raise
    _remove_partial(str(mngr.directory), step)
    kept = [s for s in steps(str(mngr.directory)) if s != step]
    reason = next((w for w in OS_WORDS if w in str(e)), first_line(e))
    raise UserError(f"cannot save the checkpoint of step {step} in {mngr.directory} ({reason}); "
                    f"{'the last good checkpoint is step ' + str(kept[-1]) if kept else 'no checkpoint was saved'}. "
                    f"Free space or fix the permissions, then run the same command again to resume") from None


def digest(folder: str) -> dict:
  """{relative path: SHA-256} of every file under a step's folder, the checksum file left out."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      rel = os.path.relpath(path, folder)
      if rel == CHECKSUMS:
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda f=f: f.read(1 << 20), b""):
          h.update(block)
      out[rel] = h.hexdigest()
  return out


def verify(folder: str) -> str | None:
  """None if every file of the step matches its checksum (or the step predates checksums), else what differs."""
  path = os.path.join(folder, CHECKSUMS)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      expected = json.load(f)
  except (OSError, ValueError) as e:
    return f"its {CHECKSUMS} is unreadable ({e.__class__.__name__})"
  found = digest(folder)
  for rel in sorted(set(expected) | set(found)):
    if rel not in found:
      return f"{rel} is missing"
    if rel not in expected:
      return f"{rel} was not saved with it"
    if found[rel] != expected[rel]:
      return f"{rel} differs from its checksum"
  return None


def restore(mngr: ocp.CheckpointManager, abstract_state, set_aside: bool = False):
  """The newest checkpoint whose checksums hold, shaped like `abstract_state`; None if there is none at all.

  A damaged step is skipped with a line (and moved to WORKDIR/damaged-checkpoints/ when `set_aside`, so
  training can save that step again); if every step is damaged, a UserError. Every process of a multi-process
  job checks the steps before process 0 moves any, and all must find the same step.
  """
  directory = str(mngr.directory)
  saved, damaged, good = steps(directory), {}, None
  for step in reversed(saved):
    damaged[step] = verify(os.path.join(directory, str(step)))
    if damaged[step] is None:
      del damaged[step]
      good = step
      break
  found = collectives.gather(-1 if good is None else good)
  if len(set(found)) > 1:
    raise UserError(f"the processes of this job find different newest whole checkpoints in {directory} (steps "
                    f"{', '.join(str(s) if s >= 0 else 'none' for s in found)}, by process): give a --workdir that "
                    f"every process shares, or run the job again once the file system has settled")
  for step, problem in damaged.items():
    folder = os.path.join(directory, str(step))
    note = f"checkpoint {folder} is damaged ({problem}): not used"
    if set_aside and good is not None:  # never when nothing whole is left
      aside = os.path.join(os.path.dirname(directory), "damaged-checkpoints", f"{step}-{int(time.time())}")
      if on_main_process():
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.move(folder, aside)
      note += f", moved to {aside}"
    say(note)
  if good is None:
    if saved:
      raise UserError(f"every checkpoint in {directory} is damaged (steps {', '.join(map(str, saved))}); "
                      f"use a new --workdir, or restore the folder from a backup")
    return None
  with _quiet():
    if set_aside and damaged:
      collectives.barrier("eejax_damaged_checkpoints_set_aside")  # process 0 has moved them
      mngr.reload()  # the manager forgets the steps set aside
    return _restore_step(mngr, good, abstract_state)


def _restore_step(mngr, step: int, abstract_state):
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # orbax raises many types for corrupt or mismatched checkpoints
    where = os.path.join(str(mngr.directory), str(step))
    raise UserError(
        f"cannot restore the checkpoint {where} ({e.__class__.__name__}: {_restore_problem(e)}). "
        f"It is corrupt or was written by a different model config; move that folder away to resume "
        f"from an earlier checkpoint, or use a new --workdir") from None


def _restore_problem(e: Exception, limit: int = 400) -> str:
  """The error's first line; for orbax's tree mismatch also where the trees differ, on the same line, e.g.
  'tree structures do not match: opt_state: this config builds (<class 'list'>, 3) against the checkpoint's ...'."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if "structures do not match" not in (lines or [""])[0]:
    return first_line(e)
  where = [line.replace("- Source:", "this config builds").replace("- Target:", "against the checkpoint's")
           for line in lines[1:] if not line.startswith("If this mismatch")]
  text = " ".join(lines[:1] + where)
  return text if len(text) <= limit else text[:limit] + " ..."


def restore_from_workdir(workdir: str, abstract_state):
  """The latest good checkpoint of another run's workdir (init_from, teachers, `load_run`), or a UserError."""
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    raise UserError(f"no checkpoints in {workdir!r}: expected {path}/<step>/ from a finished eejax run")
  with _quiet():
    mngr = ocp.CheckpointManager(os.path.abspath(path))
  state = restore(mngr, abstract_state)
  if state is None:
    raise UserError(f"no checkpoints in {path}")
  return state


def steps(directory: str) -> list[int]:
  """The finished steps in a checkpoints folder, in order (orbax writes a step under a temporary name first)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def _remove_partial(directory: str, step: int) -> None:
  """What a failed save of `step` left: its folder and orbax's temporary ones."""
  if not on_main_process() or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if name == str(step) or (name.startswith(f"{step}.") and "tmp" in name):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _is_os_error(e: BaseException) -> bool:
  """An OSError anywhere in the chain, or tensorstore's words for one."""
  while e is not None:
    if isinstance(e, OSError) or any(w in str(e) for w in OS_WORDS):
      return True
    e = e.__cause__ or e.__context__
  return False


def as_abstract(tree, sharding):
  """ShapeDtypeStructs of `tree` (arrays or structs) with `sharding`, for restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
