"""JAX's persistent compilation cache, on for every training job unless switched off.

A job started again (resumed after a stop, a finished run evaluated again) or one of a launcher's many runs of
the same model loads its compiled programs from disk instead of compiling them again; on a GPU, XLA's
convolution autotuning results are kept there too (JAX's `jax_persistent_cache_enable_xla_caches`). The
folder is `config.compile_cache_dir` (`~/.cache/eejax/xla` by default; '' leaves JAX's setting alone). JAX's
own setting wins where it has one (the JAX_COMPILATION_CACHE_DIR environment variable, or `jax.config`):
eejax never moves a cache its user placed.

JAX keys every entry by the program, the jax and XLA versions, the backend and its flags, so an entry is
reused only where it is the same compilation. The folder grows by one file per distinct program (a few
hundred KB on a CPU) and can be deleted at any time. JAX treats the folder as trusted code: keep it private.
Each job starts by keeping eejax's folder under `config.compile_cache_max_gb` (`prune`): the entries used
longest ago go first. A job can add to it while it runs; the next job trims it again.

The commands that read a finished run (`eejax.export`, `eejax.certify`) use that run's folder too
(`enable_for_run`), where it can be written.

A multi-process job on CPUs runs without the cache where JAX cannot run what it loads from it
(`cached_collectives_hang`): with jax 0.12.1, a program with cross-process collectives loaded from the cache
never returns.

JAX writes an entry in place, so a write cut short (a full disk, a killed process) leaves half a file, which
JAX would then fail to read on every later job, with a warning each time, and never write again. In eejax's
folder such an entry is removed when JAX reports it, with one line; the job compiles the program and saves
it anew.
"""
import functools
import importlib
import os
import re
import sys
import warnings
import zlib

import jax

from eejax import collectives, workdirs
from eejax.errors import UserError

_PROBLEM = re.compile(r"Error (reading|writing) persistent compilation cache entry for '([^']+)': (.*)", re.S)
_repaired_folders = set()  # folders whose damaged entries this process removes (see `_repairing`)
DEFAULT_FOLDER = "~/.cache/eejax/xla"  # config.compile_cache_dir; also for runs saved before they had the key
DEFAULT_MAX_GB = 2.0  # config.compile_cache_max_gb


def jax_folder() -> str | None:
  """The folder JAX already caches in (from JAX_COMPILATION_CACHE_DIR or `jax.config`), or None."""
  return jax.config.jax_compilation_cache_dir or None


def enable(path: str, max_gb: float = DEFAULT_MAX_GB) -> str | None:
  """Points JAX's compilation cache at `path` (~ expanded) unless JAX already has a folder; returns the folder
  in use, or None where there is none ('' and no folder of JAX's own).

  Takes effect for compilations after the call, also where this process compiled something before. The folder
  is first pruned to `max_gb` (0: no limit); a folder of JAX's own is left as JAX manages it.
  """
  current = jax_folder()
  folder = os.path.abspath(os.path.expanduser(path)) if path and not current else None
  trim(folder, max_gb)  # every process of a job comes here, whatever its own folder, for trim's barrier
  if not jax.config.jax_enable_compilation_cache:  # off by JAX's setting, or by `off_where_loads_hang`
    return None
  if current:
    return current
  if folder is None:
    return None
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  compilation_cache.set_cache_dir(folder)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's 1 s leaves out ~80 small programs a
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # run compiles, 10 s on a 2-core CPU
  compilation_cache.reset_cache()  # where a JAX version decided at its first compilation: decide again
  if not _repaired_folders:
    warnings.showwarning = _repairing(warnings.showwarning)
  _repaired_folders.add(folder)
  return folder


def cached_collectives_hang(version: str, platform: str, processes: int) -> bool:
  """Whether a program with cross-process collectives hangs when loaded from the cache: with jax 0.12.1 on CPUs
  (Gloo), a 2-process job's training step loaded from it never returns, the same job compiling its programs
  runs; jax 0.10.2 and 0.12.0.1 run both. Releases after 0.12.1 are taken to hang until one is seen not to.

  >>> cached_collectives_hang("0.12.1", "cpu", 2), cached_collectives_hang("0.12.0.1", "cpu", 2)
  (True, False)
  """
  release = tuple(int(part) for part in re.findall(r"\d+", version)[:4])
  return processes > 1 and platform == "cpu" and release >= (0, 12, 1)


def off_where_loads_hang() -> None:
  """Switches JAX's persistent cache off for this process where `cached_collectives_hang` (call it once the job
  is joined, before it compiles); process 0 says so in one line."""
  if not cached_collectives_hang(jax.__version__, jax.default_backend(), jax.process_count()):
    return
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  if jax.process_index() == 0:
    print(f"compile cache off for this job: with jax {jax.__version__}, a multi-process job on CPUs hangs in the "
          "collectives of programs loaded from the cache; every process compiles its programs", file=sys.stderr,
          flush=True)


def trim(folder: str | None, max_gb: float) -> None:
  """`prune` to `max_gb` (0: no limit; folder None: none to trim), saying what it removed in one line. In a
  multi-process job process 0 trims first and the others after it, so that processes sharing a folder (one host)
  print one line, not one each, and a host with a folder of its own (several hosts) trims it too, naming its
  process. Every process of the job must call it (it waits for all), with or without a folder."""
  joined = jax.distributed.is_initialized() and jax.process_count() > 1
  first = not joined or jax.process_index() == 0
  if first:
    _prune_and_say(folder, max_gb, "")
  if joined:
    collectives.barrier("eejax_compile_cache_trim")
  if not first:
    _prune_and_say(folder, max_gb, f"process {jax.process_index()}: ")


def _prune_and_say(folder: str | None, max_gb: float, who: str) -> None:
  if not folder or max_gb <= 0:
    return
  removed, freed = prune(folder, int(max_gb * 2**30))
  if removed:
    print(f"{who}compile cache {folder}: the {removed} file(s) used longest ago removed ({freed / 2**20:.1f} MB), "
          f"to keep it under config.compile_cache_max_gb={max_gb:g}", file=sys.stderr, flush=True)


def enable_for_run(config) -> str | None:
  """`enable` with a finished run's settings, for a command that reads the run (export, certify): the default
  folder for a run saved before it had one, and none, without a word, where the folder cannot be written (these
  commands do not need the cache; a training job says so instead, see `eejax.api`)."""
  path = config.get("compile_cache_dir", DEFAULT_FOLDER)
  if not jax_folder() and path:
    try:
      workdirs.check_path(path, "compile cache", "compile_cache_dir")
    except UserError:
      return None
  return enable(path, config.get("compile_cache_max_gb", DEFAULT_MAX_GB))


def prune(folder: str, max_bytes: int) -> tuple[int, int]:
  """Removes the files of `folder` (and its subfolders: XLA's autotuning) used longest ago, by the later of
  their access and modification times, until the rest hold at most `max_bytes`; returns (files, bytes) removed.
  (Linux's default `relatime` moves a file's access time at most once a day: "used" is to the day.)

  Safe beside a job that uses the folder: a file removed while it is read stays readable to that reader, and a
  program not found is compiled again. Hidden files (locks) are never counted or removed.
  """
  files = []
  for root, _, names in os.walk(folder):
    for name in names:
      if name.startswith("."):
        continue
      path = os.path.join(root, name)
      try:
        st = os.stat(path)
      except FileNotFoundError:  # another job removed it
        continue
      files.append((max(st.st_atime, st.st_mtime), st.st_size, path))
  total = sum(size for _, size, _ in files)
  removed, freed = 0, 0
  for _, size, path in sorted(files):
    if total - freed <= max_bytes:
      break
    try:
      os.remove(path)
      removed += 1
      freed += size
    except FileNotFoundError:
      freed += size
  return removed, freed


@functools.cache
def _codecs() -> tuple:
  """The decompressors of the codecs JAX may write with: zlib, and zstd where installed (found once)."""
  codecs = [zlib.decompress]
  for module, make in (("compression.zstd", lambda m: m.decompress),
                       ("zstandard", lambda m: m.ZstdDecompressor().decompress)):
    try:
      codecs.append(make(importlib.import_module(module)))
    except ImportError:
      pass
  return tuple(codecs)


def whole(data: bytes) -> bool:
  """Whether an entry's bytes decompress with a codec JAX writes: a write cut short leaves a truncated stream
  that none does."""
  for decompress in _codecs():
    try:
      decompress(data)
      return True
    except Exception:  # pylint: disable=broad-except  # each codec has its own error
      pass
  return False


def remove_entries(folder: str, name: str, all_if_whole: bool = True) -> int:
  """Removes the entries of the program `name` (files NAME-<sha256>-cache) in `folder` that are not whole, or,
  with `all_if_whole`, all of them where every one is (JAX could not read one all the same); returns how many."""
  entry = re.compile(re.escape(name) + r"-[0-9a-f]{64}-cache")
  paths = [os.path.join(folder, file) for file in os.listdir(folder) if entry.fullmatch(file)]
  damaged = [path for path in paths if not whole(_read(path))]
  removed = 0
  for path in damaged or (paths if all_if_whole else []):
    try:
      os.remove(path)
      removed += 1
    except FileNotFoundError:  # another job removed it first
      pass
  return removed


def _read(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    return b""


def _repairing(show):
  """warnings.showwarning that turns JAX's failure to read or write an entry of eejax's folder into one line and
  removes that program's entries (half written, or unreadable), so that the next save writes them whole."""
  def showwarning(message, category, filename, lineno, file=None, line=None):
    problem = _PROBLEM.search(str(message))
    folder = jax_folder()
    if problem is None or folder not in _repaired_folders:
      return show(message, category, filename, lineno, file, line)
    verb, name, why = problem.groups()
    removed = remove_entries(folder, name, all_if_whole=verb == "reading")  # a failed write: only its half file
    print(f"warning: the compile cache {folder} could not {dict(reading='read', writing='write')[verb]} the "
          f"compiled program {name} "
          f"({why.splitlines()[0]}); {removed} file(s) removed, the program is compiled "
          f"{'again and saved anew' if verb == 'reading' else 'again by the next job'}", file=sys.stderr, flush=True)
  return showwarning
