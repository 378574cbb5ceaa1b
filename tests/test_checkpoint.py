"""Checkpoint save/restore, corrupt checkpoints, failed saves."""
import asyncio
import gc
import logging
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from eejax import checkpoint, sharding
from eejax.errors import UserError


def test_save_restore_roundtrip_and_corruption(tmp_path):
  rep = sharding.replicated(sharding.make_mesh())
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(5)}
  mngr = checkpoint.manager(str(tmp_path))
  assert checkpoint.restore(mngr, checkpoint.as_abstract(state, rep)) is None
  checkpoint.save(mngr, 5, state)
  restored = checkpoint.restore(mngr, checkpoint.as_abstract(state, rep))
  np.testing.assert_array_equal(restored["w"], state["w"])
  folder = tmp_path / "checkpoints" / "5"
  os.remove(folder / checkpoint.CHECKSUMS)  # as an older eejax saved it: restored as it is, so orbax must object
  for dirpath, _, files in os.walk(folder):
    for name in files:
      with open(os.path.join(dirpath, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(UserError, match=r"cannot restore the checkpoint .*5.*move that folder away"):
    checkpoint.restore(checkpoint.manager(str(tmp_path)), checkpoint.as_abstract(state, rep))


def _data_files(folder):
  return sorted(os.path.join(d, n) for d, _, files in os.walk(folder) for n in files if n != checkpoint.CHECKSUMS)


def _flip(path, bit):
  with open(path, "r+b") as f:
    f.seek(bit // 8)
    byte = f.read(1)[0]
    f.seek(bit // 8)
    f.write(bytes([byte ^ (1 << bit % 8)]))


def test_a_flipped_bit_anywhere_is_never_restored(tmp_path, capsys):
  """Every data file of the newest step, bits at spread positions one at a time: each restore path gets the
  step before (whole) with a line, never the damaged weights; a step with no good one before is an error."""
  rep = sharding.replicated(sharding.make_mesh())
  old = {"w": jnp.arange(4096.0).reshape(64, 64), "step": jnp.int32(5)}
  new = {"w": -jnp.arange(4096.0).reshape(64, 64), "step": jnp.int32(10)}
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 5, old)
  checkpoint.save(mngr, 10, new)
  abstract = checkpoint.as_abstract(old, rep)
  files = _data_files(tmp_path / "checkpoints" / "10")
  assert len(files) >= 5
  tried = 0
  for path in files:
    size_bits = os.path.getsize(path) * 8
    for bit in sorted({0, 7, size_bits // 3, size_bits // 2 + 3, size_bits - 1}):
      _flip(path, bit)
      for restore in (lambda: checkpoint.restore(checkpoint.manager(str(tmp_path)), abstract),
                      lambda: checkpoint.restore_from_workdir(str(tmp_path), abstract)):
        got = restore()
        assert int(got["step"]) == 5, (path, bit)
        np.testing.assert_array_equal(got["w"], old["w"])
        assert "is damaged" in capsys.readouterr().out
        tried += 1
      _flip(path, bit)  # back to whole
  assert tried >= 50
  got = checkpoint.restore(checkpoint.manager(str(tmp_path)), abstract)
  np.testing.assert_array_equal(got["w"], new["w"])  # whole again: the newest step
  _flip(files[0], 3)
  _flip(_data_files(tmp_path / "checkpoints" / "5")[-1], 3)
  with pytest.raises(UserError, match="every checkpoint in .* is damaged"):
    checkpoint.restore(checkpoint.manager(str(tmp_path)), abstract)


def test_training_sets_a_damaged_step_aside_and_can_save_it_again(tmp_path):
  rep = sharding.replicated(sharding.make_mesh())
  old, new = {"w": jnp.zeros(8)}, {"w": jnp.ones(8)}
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 5, old)
  checkpoint.save(mngr, 10, new)
  _flip(_data_files(tmp_path / "checkpoints" / "10")[0], 1)
  mngr = checkpoint.manager(str(tmp_path))
  got = checkpoint.restore(mngr, checkpoint.as_abstract(old, rep), set_aside=True)
  np.testing.assert_array_equal(got["w"], old["w"])
  assert len(os.listdir(tmp_path / "damaged-checkpoints")) == 1
  checkpoint.save(mngr, 10, new)  # the step can be saved again
  np.testing.assert_array_equal(checkpoint.restore(mngr, checkpoint.as_abstract(old, rep))["w"], new["w"])


def test_processes_that_find_different_steps_are_one_error_and_nothing_is_moved(tmp_path, monkeypatch):
  """In a multi-process job every process must find the same newest whole step (one shared workdir)."""
  rep = sharding.replicated(sharding.make_mesh())
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 5, {"w": jnp.zeros(8)})
  checkpoint.save(mngr, 10, {"w": jnp.ones(8)})
  _flip(_data_files(tmp_path / "checkpoints" / "10")[0], 1)
  monkeypatch.setattr(checkpoint.collectives, "gather", lambda step: [step, 10])  # process 1 sees step 10 whole
  with pytest.raises(UserError, match=r"find different newest whole checkpoints in .* \(steps 5, 10, by process\)"):
    checkpoint.restore(checkpoint.manager(str(tmp_path)), checkpoint.as_abstract({"w": jnp.zeros(8)}, rep),
                       set_aside=True)
  assert checkpoint.steps(str(tmp_path / "checkpoints")) == [5, 10]
  assert not os.path.exists(tmp_path / "damaged-checkpoints")


def test_a_save_on_a_full_disk_is_one_error_and_leaves_the_last_good_step(tmp_path, monkeypatch):
  """Simulated ENOSPC (the real one, on a small tmpfs, is in tests/test_faults.py)."""
  rep = sharding.replicated(sharding.make_mesh())
  state = {"w": jnp.arange(8.0)}
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 5, state)

  def full(step, args, force):
    del args, force
    os.makedirs(tmp_path / "checkpoints" / f"{step}.orbax-checkpoint-tmp" / "default")  # what a write leaves
    raise ValueError("RESOURCE_EXHAUSTED: Failed to write: No space left on device [os_error_code='28']")
  monkeypatch.setattr(mngr, "save", full)
  with pytest.raises(UserError, match=r"cannot save the checkpoint of step 10 .*No space left.*last good checkpoint "
                                      r"is step 5"):
    checkpoint.save(mngr, 10, state)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]  # nothing half-written left
  np.testing.assert_array_equal(checkpoint.restore(checkpoint.manager(str(tmp_path)),
                                                   checkpoint.as_abstract(state, rep))["w"], state["w"])


def test_a_failed_saves_own_threads_end_quiet_before_the_error(tmp_path, monkeypatch, capfd):
  """Orbax's threads of a failed write may still run, and log a traceback, after the write has failed: the error
  waits for them while orbax's logging is quiet, so nothing follows eejax's one line."""
  import threading  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  mngr = checkpoint.manager(str(tmp_path))

  class Straggler(threading.Thread):  # as orbax's _SignalingThread: defined in orbax, logs what went wrong
    __module__ = "orbax.checkpoint.fake"

    def run(self):
      time.sleep(0.5)
      try:
        raise RuntimeError("cannot schedule new futures after shutdown")
      except RuntimeError:
        logging.exception("straggler raised an exception")
  stragglers = []

  def full(step, args, force):
    del step, args, force
    stragglers.append(Straggler())
    stragglers[-1].start()
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(mngr, "save", full)
  with pytest.raises(UserError, match="No space left on device"):
    checkpoint.save(mngr, 10, {"w": jnp.arange(8.0)})
  assert not stragglers[0].is_alive()  # joined before the error left save()
  time.sleep(0.2)
  assert "straggler" not in capfd.readouterr().err


def test_the_writes_a_failed_save_leaves_in_flight_end_without_a_word(tmp_path, monkeypatch, caplog):
  """As orbax-checkpoint 0.12 fails on a full disk: writes still in flight end on the save's closed event loop
  (an unraisable `RuntimeError: Event loop is closed` each), and failed writes that nobody awaited are logged by
  asyncio when collected, at the process's exit. Neither shows; any other unraisable or asyncio line still does."""
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  loop = asyncio.new_event_loop()
  unawaited = []

  class Write:
    def __init__(self, error):
      self.error = error

    def __del__(self):  # raising here is what Python hands to sys.unraisablehook
      if self.error is None:
        loop.call_soon_threadsafe(print)  # the loop is closed: RuntimeError('Event loop is closed')
      raise self.error

  def fails(error):
    future = loop.create_future()
    future.set_exception(error)
    return future

  def full(step, args, force):
    del step, args, force
    loop.close()
    Write(None)  # ends at once, on the closed loop
    unawaited.extend([fails(ValueError("RESOURCE_EXHAUSTED: No space left on device [os_error_code='28']")),
                      fails(OSError(28, "No space left on device"))])
    raise ValueError("RESOURCE_EXHAUSTED: Failed to write: No space left on device [os_error_code='28']")
  mngr = checkpoint.manager(str(tmp_path))
  monkeypatch.setattr(mngr, "save", full)
  try:
    with pytest.raises(UserError, match="No space left on device"):
      checkpoint.save(mngr, 10, {"w": jnp.arange(8.0)})
    hook = sys.unraisablehook
    with pytest.raises(UserError):  # a second failed save in the same process keeps the one hook
      checkpoint.save(mngr, 11, {"w": jnp.arange(8.0)})
    assert sys.unraisablehook is hook
    with caplog.at_level(logging.ERROR, logger="asyncio"):
      unawaited.clear()  # collected after the error, as at the exit
      gc.collect()
      assert not unraisable and not caplog.records
      Write(KeyError("anything else"))
      unawaited.append(fails(RuntimeError("not a full disk")))
      unawaited.clear()
      gc.collect()
    assert [type(u.exc_value) for u in unraisable] == [KeyError]
    assert [r.getMessage().splitlines()[0] for r in caplog.records] == ["Future exception was never retrieved"]
    assert "not a full disk" in str(caplog.records[0].exc_info[1])
  finally:
    logging.getLogger("asyncio").removeFilter(checkpoint._unretrieved_failed_write)  # pylint: disable=protected-access


def test_a_save_that_succeeds_leaves_the_unraisable_hook_as_it_was(tmp_path):
  before = sys.unraisablehook
  checkpoint.save(checkpoint.manager(str(tmp_path)), 1, {"w": jnp.arange(8.0)})
  assert sys.unraisablehook is before


def test_a_checkpoint_of_another_shape_says_where_it_differs(tmp_path):
  """An optimizer or model changed since the save: the one line names the part that differs and both shapes."""
  rep = sharding.replicated(sharding.make_mesh())
  saved = {"params": {"w": jnp.arange(8.0)}, "opt_state": [jnp.zeros(2), jnp.zeros(3)]}
  checkpoint.save(checkpoint.manager(str(tmp_path)), 5, saved)
  grown = {"params": {"w": jnp.arange(8.0)}, "opt_state": [jnp.zeros(2), jnp.zeros(3), jnp.zeros(1)]}
  with pytest.raises(UserError) as e:
    checkpoint.restore(checkpoint.manager(str(tmp_path)), checkpoint.as_abstract(grown, rep))
  assert ("tree structures do not match: opt_state: this config builds (<class 'list'>, 3) against the "
          "checkpoint's (<class 'list'>, 2)). It is corrupt or was written by a different model config") in str(e.value)
  assert "\n" not in str(e.value) and "partial_restore" not in str(e.value)


def test_restore_from_a_folder_without_checkpoints(tmp_path):
  with pytest.raises(UserError, match="no checkpoints"):
    checkpoint.restore_from_workdir(str(tmp_path), {})
