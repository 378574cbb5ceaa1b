"""Checkpoints (one orbax CheckpointManager per workdir) and clean stops on signals.

Orbax saves and restores; it does not react to SIGTERM or Ctrl-C in a
single-process run, so `StopSignal` records the signal and the training loop
saves and leaves at the next chunk boundary.
"""
import os
import signal

import jax
import orbax.checkpoint as ocp

from eejax.errors import UserError


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Saves `state` (a pytree) at `step` and waits until it is on disk."""
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """The checkpoint at `step` (default: latest) shaped like `abstract_state`, or None if there is none."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # orbax raises many types for corrupt or mismatched checkpoints
    where = os.path.join(str(mngr.directory), str(step))
    raise UserError(
        f"cannot restore the checkpoint {where} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}). "
        f"It is corrupt or was written by a different model config; move that folder away to resume "
        f"from an earlier checkpoint, or use a new --workdir") from None


def restore_from_workdir(workdir: str, abstract_state):
  """The latest checkpoint of another run's workdir (init_from, teachers), or a UserError."""
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    raise UserError(f"no checkpoints in {workdir!r}: expected {path}/<step>/ from a finished eejax run")
  mngr = ocp.CheckpointManager(os.path.abspath(path))
  state = restore(mngr, abstract_state)
  if state is None:
    raise UserError(f"no checkpoints in {path}")
  return state


def as_abstract(tree, sharding):
  """ShapeDtypeStructs of `tree` (arrays or structs) with `sharding`, for restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class StopSignal:
  """Context manager: SIGTERM or the first Ctrl-C sets `.signum` instead of killing.

  A second Ctrl-C raises KeyboardInterrupt as usual. Handlers are only
  installed from the main thread; elsewhere this is a no-op.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    try:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    except ValueError:  # not the main thread
      pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class Stopped(Exception):
  """Training stopped on a signal after saving a checkpoint; rerun to resume."""

  def __init__(self, signum: int, step: int, workdir: str, where: str | None = None):
    where = where or f"at step {step}; checkpoint saved"
    super().__init__(f"stopped by {signal.Signals(signum).name} {where} in {workdir}; "
                     f"run the same command again to resume")
    self.exit_code = 128 + signum
