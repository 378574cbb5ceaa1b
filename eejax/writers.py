"""Metrics to JSONL and TensorBoard, and a progress line for long work.

clu's metric writers import TensorFlow at import time (even the TensorBoard
writer), which eejax must not need, so this module writes TensorBoard event
files with tensorboardX (protobuf only) and JSONL with the standard library.
Only process 0 of a multi-process job writes and prints (`on_main_process`).
"""
import contextlib
import json
import os
import sys
import threading
import time
import weakref

import jax

_OPEN = weakref.WeakSet()  # MetricWriters not closed yet: `close_all` closes them before the process ends at once


def on_main_process() -> bool:
  """True in a single-process run and on process 0 of a multi-process job: the one process that prints and writes.

  Asks nothing of JAX's backends before a job is joined, so it is safe before `eejax.distributed.initialize`.
  """
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def say(message: str, stream=None) -> None:
  """print(), on the main process only."""
  if on_main_process():
    print(message, file=stream or sys.stdout, flush=True)


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without PyTorch where PyTorch is installed and not yet loaded.

  tensorboardX imports torch when it can, for its graph and tensor helpers; eejax writes scalars only, and a job
  would pay the import (1.5 to 2 s with a CPU build, more with CUDA) on every run. A tensorboardX that needs torch
  after all is imported again as it is.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX takes for "not installed"
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  except ImportError:  # forget the half-imported package, so the import below starts afresh
    for name in [m for m in sys.modules if m == "tensorboardX" or m.startswith("tensorboardX.")]:
      del sys.modules[name]
  finally:
    del sys.modules["torch"]
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter


class MetricWriter:
  """`write(step, {name: scalar})` to workdir/metrics.jsonl and workdir/tb/."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self._active = on_main_process()
    self._jsonl = self._tb = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      if tensorboard:
        try:
          SummaryWriter = _summary_writer()  # pylint: disable=invalid-name
        except ImportError:
          print("tensorboardX is not installed: metrics go to metrics.jsonl only (pip install tensorboardX "
                "for TensorBoard files)", file=sys.stderr)
        else:
          self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=30)
      _OPEN.add(self)

  def write(self, step: int, scalars: dict) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, int(step))

  def close(self) -> None:
    """Flushes and closes both files; a second call does nothing."""
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    self._jsonl = self._tb = None
    self._active = False
    _OPEN.discard(self)


def close_all(timeout_s: float = 5.0) -> None:
  """Closes every open MetricWriter, waiting `timeout_s` at most in all: for a process about to end at once
  (`os._exit` runs no `finally`), which would otherwise lose TensorBoard's unflushed events."""
  closing = [threading.Thread(target=w.close, daemon=True) for w in list(_OPEN)]
  deadline = time.monotonic() + timeout_s
  for thread in closing:
    thread.start()
  for thread in closing:
    thread.join(max(0.0, deadline - time.monotonic()))


def hms(seconds: float) -> str:
  """'1h02m03s', '2m03s'."""
  seconds = int(max(seconds, 0))
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Step, loss, images/s and ETA on one line (rewritten in a terminal, else printed at intervals).

  The rate and ETA count from the first `update` on, so compilation of the
  first chunk is not in the rate, nor is time spent inside `paused()` (the
  validation during training). `note` (say, the latest validation accuracy)
  ends the line.
  """

  def __init__(self, total_steps: int, batch_size: int, every_s: float = 10.0, stream=None):
    self.total, self.batch_size, self.every_s = total_steps, batch_size, every_s
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self._start = self._start_step = None
    self._last_print = self._paused_s = 0.0
    self.active = on_main_process()
    self.note = ""
    self._last = None  # (step, loss) of the last update

  @contextlib.contextmanager
  def paused(self):
    """Time inside this block counts neither in the rate nor in the ETA."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      if self._start is not None:
        self._paused_s += time.perf_counter() - t0

  def _elapsed(self, now: float) -> float:
    return now - self._start - self._paused_s

  def update(self, step: int, loss: float, force: bool = False) -> None:
    now = time.perf_counter()
    if self._start is None:
      self._start, self._start_step = now, step
    self._last = step, loss
    if not self.active or (not force and not self.tty and now - self._last_print < self.every_s):
      return
    self._last_print = now
    done = step - self._start_step
    rate = done / self._elapsed(now) if done else 0.0
    eta = (self.total - step) / rate if rate else float("nan")
    line = (f"step {step}/{self.total} ({100 * step / self.total:.0f}%) loss {loss:.4f} "
            f"{rate * self.batch_size:,.0f} img/s ETA {hms(eta) if rate else '?'}{' ' + self.note if self.note else ''}")
    self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
    self.stream.flush()

  def refresh(self) -> None:
    """The last update's line again, printed now, with the current note (a new validation accuracy)."""
    if self._last is not None:
      self.update(*self._last, force=True)

  def images_per_second(self, step: int) -> float:
    if self._start is None or step == self._start_step:
      return float("nan")
    return (step - self._start_step) * self.batch_size / self._elapsed(time.perf_counter())

  def close(self) -> None:
    """Ends the rewritten line in a terminal; a second call does nothing."""
    if self.active and self.tty:
      self.stream.write("\n")
    self.active = False


class Count:
  """`decoding PATH: 12,000 of 50,000 images (24%) ETA 0m41s`, printed every 10 s (only for long work: decoding a
  dataset, evaluating, extracting features), then the total time."""

  def __init__(self, what: str, total: int, every_s: float = 10.0, stream=None):
    self.what, self.total, self.every_s, self.done = what, total, every_s, 0
    self.stream = stream or sys.stderr
    self._t0 = self._last = time.perf_counter()
    self.printed = False
    self.active = on_main_process()

  def tick(self, item):
    """Counts one image; returns `item` (for use inside a comprehension)."""
    self.add(1)
    return item

  def add(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if self.active and now - self._last >= self.every_s:
      self._last = now
      rate = self.done / (now - self._t0)
      self.stream.write(f"{self.what}: {self.done:,} of {self.total:,} images ({100 * self.done / self.total:.0f}%) "
                        f"ETA {hms((self.total - self.done) / rate)}\n")
      self.stream.flush()
      self.printed = True

  def close(self) -> None:
    if self.printed:
      self.stream.write(f"{self.what}: {self.total:,} images in {time.perf_counter() - self._t0:.0f} s\n")
