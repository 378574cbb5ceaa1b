"""launch/steps.py: a deadline stops the running step's whole process group; no step outlives its launcher."""
import os
import signal
import subprocess
import sys
import time

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "launch"))
import steps  # pylint: disable=wrong-import-position


def alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:
    return f.read().split()[2] != "Z"


def test_a_deadline_stops_the_step_and_its_children_and_leaves_the_rest(tmp_path):
  pids = tmp_path / "pids"
  # A launcher-like step: it starts a child in its group, which answers SIGTERM by writing a note and exiting.
  child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], 'w').write('saved'),"
           " sys.exit(143))); time.sleep(60)")
  launcher = (f"import subprocess, sys, os; p = subprocess.Popen([sys.executable, '-c', {child!r}, {str(tmp_path / 'note')!r}]);"
              f" open({str(pids)!r}, 'w').write(str(p.pid)); p.wait()")
  start = time.monotonic()
  left = steps.run_steps(str(tmp_path), [("long", [sys.executable, "-c", launcher]), ("next", ["true"])],
                         dict(os.environ), deadline=time.monotonic() + 3)
  assert left == ["long", "next"] and time.monotonic() - start < 10
  assert (tmp_path / "note").read_text() == "saved"  # the grandchild got SIGTERM and finished its save
  assert not alive(int(pids.read_text()))
  assert steps.record(str(tmp_path), "long") is None  # not finished: it runs again next time


def test_a_step_dies_with_its_launcher(tmp_path):
  pid_file = tmp_path / "pid"
  code = (f"import subprocess, sys; sys.path.insert(0, {os.path.join(REPO, 'launch')!r}); import steps; "
          f"p = subprocess.Popen(steps.with_parent(['sleep', '60'])); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
          "p.wait()")
  parent = subprocess.Popen([sys.executable, "-c", code])
  deadline = time.monotonic() + 10
  while not pid_file.exists() or not pid_file.read_text():
    assert time.monotonic() < deadline
    time.sleep(0.05)
  sleeper = int(pid_file.read_text())
  time.sleep(0.3)  # the wrapper has set its death signal and exec'd sleep
  assert alive(sleeper)
  parent.send_signal(signal.SIGKILL)
  parent.wait()
  deadline = time.monotonic() + 5
  while alive(sleeper) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not alive(sleeper)


def test_the_time_limit_leaves_the_running_step_time_to_save(capsys):
  assert steps.deadline(100.0, 9) == 100.0 + 540 - 30  # 30 s before the end at most
  assert steps.deadline(0.0, 1) == 60 - 15  # a quarter of a short budget
  assert steps.deadline(5.0, 0) is None
  assert steps.end_if_left([], 9) is None  # nothing left: the caller goes on
  try:
    steps.end_if_left(["main", "bts"], 9)
  except SystemExit as e:
    assert e.code == 0  # the time limit is a normal end: the same command continues
  else:
    raise AssertionError("end_if_left returned with steps left")
  assert capsys.readouterr().out == ("stopped at the 9-minute limit; left: main, bts; run the same command again "
                                     "to continue\n")


def test_a_step_is_skipped_while_a_step_it_needs_has_failed_or_not_run(tmp_path, capsys):
  calls = tmp_path / "calls.txt"
  step = lambda word, code: [sys.executable, "-c",
                             f"open({str(calls)!r}, 'a').write({word!r}); raise SystemExit({code})"]
  needs = {"uses_a": ("a",), "uses_x": ("x",)}
  left = steps.run_steps(str(tmp_path), [("a", step("a", 2)), ("uses_a", step("u", 0)), ("free", step("f", 0)),
                                         ("uses_x", step("x", 0))], dict(os.environ), needs=needs)
  assert left == [] and calls.read_text() == "af"  # uses_a waits for a; uses_x for x, which never ran
  out = capsys.readouterr().out
  assert "uses_a: skipped, needs a, which failed" in out and "uses_x: skipped, needs x, which has not run" in out
  assert not os.path.exists(steps.record_path(str(tmp_path), "uses_a"))  # not recorded: it runs on a later call
  assert steps.blocked(str(tmp_path), "uses_a", needs) == "needs a, which failed"
  steps.run_steps(str(tmp_path), [("a", step("a", 0)), ("uses_a", step("u", 0)), ("free", step("f", 0))],
                  dict(os.environ), needs=needs)
  assert calls.read_text() == "afau" and steps.blocked(str(tmp_path), "uses_a", needs) is None
