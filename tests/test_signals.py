"""The signal guard: SIGTERM or the first Ctrl-C recorded, a second Ctrl-C interrupting, handlers put back."""
import os
import signal
import threading

import pytest

from eejax import signals


def test_stop_signal_records_sigterm_and_restores_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with signals.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before
  err = signals.Stopped(signal.SIGTERM, 12, "/w")
  assert err.exit_code == 143 and "step 12" in str(err) and "again to resume" in str(err)


def test_second_ctrl_c_interrupts():
  with signals.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGINT
    os.kill(os.getpid(), signal.SIGTERM)  # a launcher passing the stop on: the cause stays Ctrl-C
    assert stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


def test_outside_the_main_thread_it_installs_nothing():
  before, seen = signal.getsignal(signal.SIGTERM), []

  def guarded():
    with signals.StopSignal() as stop:
      seen.append((signal.getsignal(signal.SIGTERM), stop.signum))

  thread = threading.Thread(target=guarded)
  thread.start()
  thread.join()
  assert seen == [(before, None)] and signal.getsignal(signal.SIGTERM) is before
