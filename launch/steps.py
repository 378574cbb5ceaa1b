"""Resumable steps for the launch scripts: one command each, its log, a record once it finished, a deadline.

`run_steps(root, [(name, command), ...], env, deadline=...)` runs the commands
in order, each in its own process group with its output in
`root/logs/<name>.log`. A finished step leaves `root/steps/<name>.json`
(command, exit status, seconds) and is skipped on the next call with the
same command; a failed one is recorded and runs again next time. At the
deadline, or when this process gets SIGTERM or Ctrl-C, the running step's
process group gets SIGTERM (an eejax run then saves a checkpoint and exits;
the launch scripts' runs resume from it) and the step is left for the next
call, as are the steps after it. A step that needs another (`needs`) is
skipped, with a line, while that one has not finished well.
"""
import json
import os
import signal
import subprocess
import sys
import time

GRACE_S = 120.0  # how long a stopped step may take to save and exit before its group is killed
_stop = {"signum": None}  # set by SIGTERM / Ctrl-C; the loop in run_step passes it on to the running group


def absolute_source(source: str) -> str:
  """data.source with its path made absolute from the current folder, before a launcher moves to the repository
  root to run its jobs: folder:PATH and NAME:PATH; tfds:NAME and a bare NAME stay as they are."""
  kind, _, path = source.partition(":")
  if not path or kind == "tfds":
    return source
  return f"{kind}:{os.path.abspath(os.path.expanduser(path))}"


def record_path(root: str, name: str) -> str:
  return os.path.join(root, "steps", f"{name}.json")


def log_path(root: str, name: str) -> str:
  return os.path.join(root, "logs", f"{name}.log")


def record(root: str, name: str) -> dict | None:
  path = record_path(root, name)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def finished(root: str, name: str, command=None) -> bool:
  """Whether the step finished with status 0 and, given a `command`, ran that command (the interpreter aside: the
  same step run by another Python is the same step). A step recorded with another command runs again: its jobs
  then go on, evaluate again or refuse other settings, where a name alone would keep the other command's results
  under this one."""
  r = record(root, name)
  if r is None or r["status"] != 0:
    return False
  return command is None or list(r.get("command", []))[1:] == list(command)[1:]


def tail(path: str, n: int) -> list[str]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [l.rstrip() for l in f.read().replace("\r", "\n").splitlines() if l.strip()]
  return lines[-n:]


# Sets PR_SET_PDEATHSIG (SIGTERM when the parent dies; it survives exec) and becomes the command: no run
# outlives its launcher, without a preexec_fn (unsafe after fork in a multithreaded parent).
_WITH_PARENT = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 15); os.execvp(sys.argv[1], sys.argv[1:])")


def with_parent(command: list[str]) -> list[str]:
  """`command`, stopped with SIGTERM when the process that started it dies (Linux; elsewhere unchanged)."""
  if not sys.platform.startswith("linux"):
    return list(command)
  return [sys.executable, "-S", "-c", _WITH_PARENT, *command]


def _record(signum, frame):
  del frame
  _stop["signum"] = signum


def _signal_group(pgid: int, sig) -> None:
  try:
    os.killpg(pgid, sig)
  except ProcessLookupError:
    pass


def _wait_group(pgid: int, timeout_s: float) -> None:
  """Until no process of the group is left (a launcher's runs included); SIGKILL after timeout_s."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    try:
      os.killpg(pgid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.2)
  _signal_group(pgid, signal.SIGKILL)


def run_step(root: str, name: str, command: list[str], env: dict, deadline: float | None) -> str:
  """Runs one step; returns 'done', 'failed' or 'stopped' (the deadline or a signal came first)."""
  os.makedirs(os.path.dirname(log_path(root, name)), exist_ok=True)
  os.makedirs(os.path.dirname(record_path(root, name)), exist_ok=True)
  print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command)}", flush=True)
  start = time.perf_counter()
  with open(log_path(root, name), "a", encoding="utf-8") as log:
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(with_parent(command), stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
  stopped = False
  while proc.poll() is None:
    if _stop["signum"] is not None or (deadline is not None and time.monotonic() >= deadline):
      stopped = True
      _signal_group(proc.pid, signal.SIGTERM)
      try:
        proc.wait(timeout=GRACE_S)
      except subprocess.TimeoutExpired:
        pass
      break
    time.sleep(0.2)
  _wait_group(proc.pid, GRACE_S if stopped else 5.0)
  status, seconds = proc.wait(), time.perf_counter() - start
  outcome = "stopped" if stopped else ("done" if status == 0 else "failed")
  print(f"[{time.strftime('%H:%M:%S')}] {name}: {outcome} (exit status {status}) after {seconds:.0f} s", flush=True)
  print("\n".join("    " + l for l in tail(log_path(root, name), 6 if outcome == "failed" else 3)), flush=True)
  if outcome != "stopped":
    with open(record_path(root, name), "w", encoding="utf-8") as f:
      json.dump({"command": command, "status": status, "seconds": seconds}, f)
  return outcome


def catch_signals() -> dict:
  """SIGTERM and Ctrl-C from now on stop the running step (if any) and the steps after it; returns the old handlers."""
  return {sig: signal.signal(sig, _record) for sig in (signal.SIGTERM, signal.SIGINT)}


def blocked(root: str, name: str, needs: dict) -> str | None:
  """Why step `name` cannot run yet: a step it needs (`needs[name]`) failed or has not run; None when it can."""
  for other in needs.get(name, ()):
    r = record(root, other)
    if r is None or r["status"] != 0:
      return f"needs {other}, which {'has not run' if r is None else 'failed'}"
  return None


def run_steps(root: str, named_commands, env: dict, only=frozenset(), deadline: float | None = None,
              after_each=None, needs=None) -> list[str]:
  """Runs each (name, command or callable giving one) in order, skipping finished ones.

  Returns the names left undone (stopped, or not reached before the deadline or a signal); a failed step is
  recorded, reported, and the next step runs, bar those that need it (`needs`: {name: names}), which are skipped
  with a line and run on a later call. `after_each()` runs after every step (the summary).
  """
  previous = catch_signals()
  left = []
  try:
    for name, command in named_commands:
      if (only and name not in only) or finished(root, name, None if callable(command) else command):
        continue  # a callable's command may need the steps before it: known by its name alone
      if left or _stop["signum"] is not None or (deadline is not None and time.monotonic() >= deadline):
        left.append(name)
        continue
      why = blocked(root, name, needs or {})
      if why:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: skipped, {why}", flush=True)
        continue
      command = command() if callable(command) else command
      if run_step(root, name, command, env, deadline) == "stopped":
        left.append(name)
      if after_each:
        after_each()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return left


def stopped_by() -> int | None:
  """The signal that stopped `run_steps`, if one did."""
  return _stop["signum"]


def deadline(start: float, minutes: float) -> float | None:
  """When to stop the running step so that it saves its checkpoint and exits within `minutes` of `start`
  (time.monotonic()); None for no limit (minutes <= 0)."""
  if minutes <= 0:
    return None
  budget = 60 * minutes
  return start + budget - min(30.0, 0.25 * budget)


def end_if_left(left: list[str], minutes: float) -> None:
  """After `run_steps`: with steps left, says why and what, then exits (0 at the time limit, 128+signal after a
  signal); with none left, returns."""
  if not left:
    return
  why = f"stopped by {signal.Signals(stopped_by()).name}" if stopped_by() else f"stopped at the {minutes:g}-minute limit"
  print(f"{why}; left: {', '.join(left)}; run the same command again to continue", flush=True)
  sys.exit(128 + stopped_by() if stopped_by() else 0)
