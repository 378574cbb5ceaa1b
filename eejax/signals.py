"""Clean stops on signals: SIGTERM or Ctrl-C during training saves, then leaves.

Orbax saves and restores; it does not react to SIGTERM or Ctrl-C in a
single-process run, so `StopSignal` records the signal and the training loop
(and BTS-EE's branch loop) saves and leaves at the next chunk boundary with
`Stopped`, whose exit status is 128 + the signal's number, as a shell reports it.
"""
import signal


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
