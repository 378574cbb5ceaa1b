"""What every eejax command line shares: absl flags, and each way a job can end as one line on stderr.

`guarded(job, program, workdir)` runs a command's work: a mistake the user can fix (`UserError`, a full disk, a
path it may not write) is one line and status 2; a stop on a signal keeps its checkpoint and exits 128+signal;
Ctrl-C or SIGTERM anywhere else (start-up, evaluation) is one line and status 130 or 143; anything unforeseen is
one short line plus the file that holds the whole traceback (status 1). Nothing here imports JAX, so `--help`
stays fast.
"""
import argparse
import contextlib
import errno
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback

from absl import app, flags

from eejax import signals
from eejax.errors import UserError, first_line

# What the user can do about each operating-system error they can cause and mend; any other is unforeseen.
REMEDIES = {**dict.fromkeys((errno.ENOSPC, errno.EDQUOT), "Free space"),
            **dict.fromkeys((errno.EACCES, errno.EPERM, errno.EROFS), "Fix its permissions or choose a writable path"),
            **dict.fromkeys((errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST), "Fix the path")}


def fail(message: str, program: str = "eejax") -> None:
  print(f"{program}: error: {message}", file=sys.stderr)
  end(2)


def end(status: int, at_once: bool = False) -> None:
  """sys.exit(status); with `at_once`, or in a multi-process job, the process ends at once instead: JAX's
  shutdown at exit waits for every process, and aborts with a stack trace when process 0, which hosts the job,
  has already gone. So process 0 of a job first waits (`eejax.distributed.wait_for_peers`) for the others."""
  in_a_job = _jax_in_a_job() is not None
  if in_a_job:
    from eejax import distributed  # pylint: disable=g-import-not-at-top
    distributed.wait_for_peers()  # process 0 hosts the job: it goes last
  if at_once or in_a_job:
    sys.stdout.flush()
    sys.stderr.flush()
    hard_exit(status)
  sys.exit(status)


def parse_flags(argv, program: str = "eejax"):
  """absl's parser, with flag and --config override mistakes as one line instead of a traceback. --help (or -h,
  which absl does not know) prints the command's flags, also where no `app.run` defined them (the launchers)."""
  app.define_help_flags()  # once; app.run defines them too
  cut = argv.index("--") if "--" in argv else len(argv)  # after `--`: a launcher's overrides for its runs
  argv = [a if i >= cut or a != "-h" else "--help" for i, a in enumerate(argv)]
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if "Traceback" in str(e) and "No such file" in str(e):
      _config_missing(_config_path(argv), program)
    fail(_config_file_message(str(e)), program)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # unknown --config.key, bad value, bad preset
    message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    fail(f"bad --config override: {message}" if "preset" not in message else message, program)
  except OSError:  # a config file that could not be loaded, met by a --config.key override
    _config_missing(_config_path(argv), program)
  except KeyboardInterrupt:
    interrupted(program)
  except Exception as e:  # pylint: disable=broad-except  # the config file's own: an import, its syntax, get_config
    _config_broken(_config_path(argv), e, program)


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser for a script's flags, whose mistakes (an unknown flag, a bad value) end as one line,
  `PROGRAM: error: ...`, status 2, as every other mistake does."""

  def __init__(self, program: str, **kwargs):
    super().__init__(**kwargs)
    self.program = program

  def error(self, message: str):
    fail(message, self.program)


def positive(kind):
  """An argparse type: a number of `kind` (int, float) above 0; anything else is argparse's usage line."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not value > 0:
      raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
    return value
  return parse


def _config_file_message(text: str) -> str:
  """A config file's own error (e.g. an unknown preset) rather than the traceback absl wraps around it."""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if "Traceback" in text and lines:
    return lines[-1].split(": ", 1)[-1]
  return lines[0] if lines else "bad flags"


def config_value(config_flag, program: str = "eejax"):
  """The parsed --config (`split_names` applied), or one line when its file could not be loaded (ml_collections
  defers that error)."""
  try:
    value = config_flag.value
    if value is not None:
      value.keys()  # a config that failed to load raises only when used
      split_names(value)
    return value
  except OSError:
    _config_missing(flags.FLAGS["config"].config_filename, program)
  except Exception as e:  # pylint: disable=broad-except
    _config_broken(flags.FLAGS["config"].config_filename.split(":")[0], e, program)


def split_names(config) -> None:
  """`--config.eval.policies=max_prob,entropy` as the two names it gives: ml_collections parses a comma-separated
  override of a tuple as a Python literal, which takes numbers apart but leaves bare names one string."""
  for key, value in config.items():
    if hasattr(value, "items"):  # a section
      split_names(value)
    elif isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], str) and "," in value[0]:
      config[key] = tuple(name.strip() for name in value[0].split(","))


def _config_broken(path: str, e: Exception, program: str) -> None:
  """One line for a config file that raised while loading, with the line of that file where it did."""
  line = e.lineno if isinstance(e, SyntaxError) else next(
      (f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
       if os.path.abspath(f.filename) == os.path.abspath(path)), None)
  what = e.msg if isinstance(e, SyntaxError) else first_line(e)
  fail(f"--config={path}: it could not be loaded ({e.__class__.__name__}: {what}"
       + (f", line {line})" if line else ")"), program)


def _config_missing(path: str, program: str) -> None:
  why = "no such file" if not os.path.exists(path) else "it could not be loaded"
  fail(f"--config={path}: {why} (give --config=configs/FILE.py[:preset])", program)


def _config_path(argv) -> str:
  """The file of --config in argv, without its :preset."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return "?"


def interrupted(program: str, signum: int = signal.SIGINT) -> None:
  """One line and status 128 + signal, ending the process at once: JAX's threads may still be compiling or
  running, and tearing the interpreter down under them can crash it. Every file eejax writes is whole or flushed
  by then."""
  how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
  print(f"{program}: {how}; every checkpoint and file already written stays whole: run the same command again to "
        f"go on", file=sys.stderr)
  end(128 + signum, at_once=True)


hard_exit = os._exit  # pylint: disable=protected-access


def exit_on_interrupt(program: str) -> None:
  """Until `guarded` runs the job, Ctrl-C or SIGTERM is one line and status 128 + signal: for a command that
  imports JAX at its top, where a KeyboardInterrupt would surface from inside an extension's import. A signal
  ignored stays ignored."""
  for sig in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(sig) != signal.SIG_IGN:
      signal.signal(sig, _StartUp(program))


class _StartUp:
  """The signal handler of `exit_on_interrupt`."""

  def __init__(self, program: str):
    self.program = program

  def __call__(self, signum, frame):
    del frame
    interrupted(self.program, signum)


def guarded(job, program: str = "eejax", workdir: str | None = None):
  """job() with every way it can end as one line (see the module docstring)."""
  sys.unraisablehook = _resend_swallowed_interrupt
  if isinstance(signal.getsignal(signal.SIGINT), _StartUp):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a KeyboardInterrupt, caught below
  sigterm = signal.getsignal(signal.SIGTERM)
  if sigterm in (signal.SIG_DFL, None) or isinstance(sigterm, _StartUp):
    with contextlib.suppress(ValueError):  # only the main thread sets handlers
      signal.signal(signal.SIGTERM, signals.raise_terminated)  # from here a Terminated, caught below
  try:
    return job()
  except UserError as e:
    fail(str(e), program)
  except KeyboardInterrupt:
    interrupted(program)
  except signals.Terminated:
    interrupted(program, signal.SIGTERM)
  except OSError as e:
    if e.errno not in REMEDIES:
      _unforeseen(e, program, workdir)
    where = f": {e.filename}" if e.filename else ""
    fail(f"{e.strerror or e}{where}. {REMEDIES[e.errno]}, then run the same command again (what was saved stays "
         f"whole)", program)
  except Exception as e:  # pylint: disable=broad-except
    stopped = _stopped(e)
    if stopped is not None:
      print(f"{program}: {e}", file=sys.stderr)
      end(stopped)
    if _in_a_job_that_lost_a_peer(e):
      from eejax import distributed  # pylint: disable=g-import-not-at-top
      distributed.lost_peer(e, workdir or ".")  # one line; never returns
    _unforeseen(e, program, workdir)
  finally:  # a caller that goes on (a test, a notebook) gets its handler back
    if signal.getsignal(signal.SIGTERM) is signals.raise_terminated:
      signal.signal(signal.SIGTERM, sigterm)


def _resend_swallowed_interrupt(unraisable, previous=sys.unraisablehook) -> None:
  """Ctrl-C that lands in a garbage-collection callback is swallowed by Python with a traceback; send it again.

  (JAX runs a callback on every collection, and start-up collects often.)
  """
  if issubclass(unraisable.exc_type, (KeyboardInterrupt, signals.Terminated)):
    sig = signal.SIGINT if issubclass(unraisable.exc_type, KeyboardInterrupt) else signal.SIGTERM
    threading.Timer(0.05, os.kill, (os.getpid(), sig)).start()
    return
  previous(unraisable)


def _stopped(e: Exception) -> int | None:
  """The exit status of a clean stop on a signal (`eejax.signals.Stopped`), else None."""
  return getattr(e, "exit_code", None) if e.__class__.__name__ == "Stopped" else None


COLLECTIVE_WORDS = ("Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "UNAVAILABLE")


def _in_a_job_that_lost_a_peer(e: Exception) -> bool:
  """In a multi-process job, a failed collective means another process died (JAX raises it as its runtime error,
  or as a ValueError from inside a jitted all-gather)."""
  jax = _jax_in_a_job()
  if jax is None or jax.process_count() == 1:
    return False
  return isinstance(e, jax.errors.JaxRuntimeError) or any(w in str(e) for w in COLLECTIVE_WORDS)


def _jax_in_a_job():
  """JAX's module once this process has joined a multi-process job; else None (JAX not loaded, or half loaded by
  an import that Ctrl-C cut short)."""
  jax = sys.modules.get("jax")
  joined = getattr(getattr(jax, "distributed", None), "is_initialized", None)
  return jax if joined is not None and joined() else None


def _unforeseen(e: BaseException, program: str, workdir) -> None:
  """A bug: a short line, and the whole traceback in a file (the workdir when writable, else the temp folder)."""
  folder = workdir if workdir and os.path.isdir(workdir) and os.access(workdir, os.W_OK) else tempfile.gettempdir()
  name = re.sub(r"[^\w.-]", "_", program)  # bench/train_step.py -> bench_train_step.py
  path = os.path.join(folder, f"{name}-traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt")
  try:
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(traceback.format_exception(e)))
  except OSError:
    path = "(could not be written)"
  print(f"{program}: internal error: {e.__class__.__name__}: {first_line(e, 300)}; the full traceback is in {path}. "
        f"Please report it with that file", file=sys.stderr)
  end(1)
