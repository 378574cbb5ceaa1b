"""Checkpoint save/restore, corrupt checkpoints, and the signal guard."""
import os
import signal

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
  for dirpath, _, files in os.walk(tmp_path / "checkpoints" / "5"):
    for name in files:
      with open(os.path.join(dirpath, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(UserError, match=r"cannot restore the checkpoint .*5.*move that folder away"):
    checkpoint.restore(checkpoint.manager(str(tmp_path)), checkpoint.as_abstract(state, rep))


def test_restore_from_a_folder_without_checkpoints(tmp_path):
  with pytest.raises(UserError, match="no checkpoints"):
    checkpoint.restore_from_workdir(str(tmp_path), {})


def test_stop_signal_records_sigterm_and_restores_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before
  err = checkpoint.Stopped(signal.SIGTERM, 12, "/w")
  assert err.exit_code == 143 and "step 12" in str(err) and "again to resume" in str(err)


def test_second_ctrl_c_interrupts():
  with checkpoint.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
