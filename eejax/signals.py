"""Clean stops on signals: SIGTERM or Ctrl-C during training saves, then leaves.

Orbax saves and restores; it does not react to SIGTERM or Ctrl-C in a
single-process run, so `StopSignal` records the signal and the training loop
(and BTS-EE's branch loop) saves and leaves at the next chunk boundary with
`Stopped`, whose exit status is 128 + the signal's number, as a shell reports it.

Outside that loop: `Terminated` is SIGTERM as an exception (`eejax.cli.guarded` ends the job with one line, as
on Ctrl-C), `interrupt_after` holds both signals back while JAX's extensions import, and `wait_for_job` runs a
training job from another process (a launcher, a benchmark) so that a stop reaches it and it saves.
"""
import contextlib
import signal
import subprocess


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
    if self.signum is None:  # the stop's cause: a launcher's SIGTERM after a terminal's Ctrl-C only confirms it
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


class Terminated(BaseException):
  """SIGTERM outside the training loop (which saves and stops on it itself): the job ends as on Ctrl-C, with one
  line, where SIGTERM's default ended it without a word."""


def raise_terminated(signum, frame):
  del signum, frame
  raise Terminated


@contextlib.contextmanager
def _handled_by(handler):
  """SIGINT and SIGTERM go to `handler` inside the block, and their handlers come back after it. A signal the
  shell ignores stays ignored; outside the main thread nothing is installed."""
  previous = {}
  with contextlib.suppress(ValueError):  # only the main thread sets handlers
    for sig in (signal.SIGINT, signal.SIGTERM):
      if signal.getsignal(sig) != signal.SIG_IGN:
        previous[sig] = signal.signal(sig, handler)
  try:
    yield
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


@contextlib.contextmanager
def interrupt_after():
  """Ctrl-C or SIGTERM inside the block is held back and raised when it ends: importing JAX's C extensions is no
  place to stop (an import cut there can crash the interpreter)."""
  held = []
  try:
    with _handled_by(lambda signum, frame: held.append(signum)):
      yield
  finally:
    if held:
      raise KeyboardInterrupt if held[0] == signal.SIGINT else Terminated


def wait_for_job(command: list[str]) -> tuple[int, int | None]:
  """Runs a training job (`python -m eejax.main ...`) to its end: (its exit status, the signal that stopped this
  process or None). Ctrl-C or SIGTERM here is passed on as SIGTERM (after a terminal's Ctrl-C, which reached the
  job too, it only confirms the stop) and the job is waited for while it saves its checkpoint: subprocess.call
  and subprocess.run killed it, losing its steps since the last one."""
  proc, got = subprocess.Popen(command), []

  def relay(signum, frame):
    del frame
    got.append(signum)
    proc.send_signal(signal.SIGTERM)
  with _handled_by(relay):
    return proc.wait(), (got[0] if got else None)
