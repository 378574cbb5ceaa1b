"""The signal guard: SIGTERM or the first Ctrl-C recorded, a second Ctrl-C interrupting, handlers put back."""
import os
import signal
import sys
import threading
import time

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


def test_a_job_is_passed_the_stop_and_waited_for_while_it_saves(tmp_path):
  """wait_for_job: SIGTERM to this process reaches the job as SIGTERM, and the job's clean stop is waited for."""
  job = ("import signal, sys, time\n"
         "def save(signum, frame):\n"
         "  time.sleep(0.5)  # a checkpoint being written\n"
         f"  open({str(tmp_path / 'saved')!r}, 'w').write(str(signum))\n"
         "  sys.exit(128 + signum)\n"
         "signal.signal(signal.SIGTERM, save)\n"
         f"open({str(tmp_path / 'started')!r}, 'w').close()\n"
         "time.sleep(60)\n")
  before = signal.getsignal(signal.SIGTERM)

  def stop_when_started():
    while not (tmp_path / "started").exists():
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
  threading.Thread(target=stop_when_started, daemon=True).start()
  status, signum = signals.wait_for_job([sys.executable, "-c", job])
  assert (status, signum) == (143, signal.SIGTERM) and (tmp_path / "saved").read_text() == "15"
  assert signal.getsignal(signal.SIGTERM) is before

