"""Fetching a file over HTTP(S) into a cache: progress, resume, checksum, atomic extraction.

`fetch(url, path, md5)` downloads into `path + '.part'` with a progress line
(bytes, rate, ETA), resumes an interrupted transfer with an HTTP Range request
(within the call, and on the next call from the `.part` left behind), checks the
MD5 that the file's publishers give, and only then renames the file into place:
a file at `path` is always whole and verified. `extract(archive, dest)` unpacks
a .tar.gz or .zip into a temporary sibling folder and renames it into place, so
`dest` is either absent or complete. The transfer itself uses the standard library only.
"""
import fcntl
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile

from eejax.errors import UserError
from eejax.writers import hms, on_main_process, say

CHUNK_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 4.0  # a server that does not answer within this is reported, never waited on
RETRIES = 5  # reconnections after a transfer dropped part-way (each resumes where it stopped)


def md5_of(path: str) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(CHUNK_BYTES), b""):
      digest.update(block)
  return digest.hexdigest()


def verify(path: str, md5: str, what: str) -> None:
  """Raises a UserError unless the file at `path` has this MD5."""
  got = md5_of(path)
  if got != md5:
    raise UserError(f"{what} {path} has MD5 {got}, not the published {md5}: the file is damaged or another "
                    "version; delete it and download it again")


def fetch(url: str, path: str, md5: str, *, remedy: str = "", stream=None) -> str:
  """Downloads `url` to `path` unless a verified file is already there; returns `path`.

  One `UserError` (naming `remedy`, what else the user can do) when the server
  cannot be reached, answers with an error, or the file's MD5 is wrong; a wrong
  file is deleted, never left in the cache.
  """
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  part = path + ".part"
  with open(path + ".lock", "w") as lock:  # two processes fetching the same file take turns
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(path):
      return path
    for attempt in range(RETRIES + 1):
      have = os.path.getsize(part) if os.path.exists(part) else 0
      try:
        if _transfer(url, part, have, stream or sys.stderr):
          break
      except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if have and getattr(e, "code", None) == 416:  # the part is already whole
          break
        if isinstance(e, urllib.error.HTTPError) or (os.path.getsize(part) if os.path.exists(part) else 0) == have:
          raise UserError(f"could not download {url}: {_reason(e)}. {remedy}".strip()) from None
      if attempt == RETRIES:
        raise UserError(f"the download of {url} kept breaking off ({RETRIES} retries); run again to resume "
                        f"from {part}. {remedy}".strip())
    try:
      verify(part, md5, "the download")
    except UserError:
      os.remove(part)
      raise UserError(f"{url} arrived with the wrong MD5 (expected {md5}); the file was deleted. Run again "
                      f"to retry; if it persists the server holds another file. {remedy}".strip()) from None
    os.replace(part, path)
  return path


def _transfer(url: str, part: str, have: int, stream) -> bool:
  """Appends the rest of `url` from byte `have` to `part`; True when the whole file arrived."""
  request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
  with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S) as response:
    if have and response.status != 206:  # the server ignores Range: start again
      have = 0
    length = response.headers.get("Content-Length")
    total = have + int(length) if length is not None else None
    bar = Bar(os.path.basename(url.split("?")[0]), total, stream, start=have)
    with open(part, "ab" if have else "wb") as f:
      while block := response.read(CHUNK_BYTES):
        f.write(block)
        bar.update(len(block))
    bar.close()
  return total is None or os.path.getsize(part) >= total


def _reason(e: Exception) -> str:
  if isinstance(e, urllib.error.HTTPError):
    return f"the server answered {e.code} {e.reason}"
  reason = getattr(e, "reason", e)
  return f"no connection ({reason})"


def extract(archive: str, dest: str) -> str:
  """Unpacks a .tar.gz / .tgz / .zip `archive` so that `dest` appears whole or not at all; returns `dest`."""
  if os.path.isdir(dest):
    return dest
  tmp = f"{dest}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  say(f"extracting {archive} ...", sys.stderr)
  try:
    if archive.endswith(".zip"):
      with zipfile.ZipFile(archive) as z:
        z.extractall(tmp)
    else:
      with tarfile.open(archive) as t:
        t.extractall(tmp, filter="data")
  except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise UserError(f"could not unpack {archive} ({e.__class__.__name__}: {e}); delete it and run again") from None
  try:
    os.replace(tmp, dest)
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
  return dest


class Bar:
  """`name  12.0 of 162.6 MiB  8.1 MiB/s  ETA 0m18s` on one line (rewritten in a terminal, else every 5 s)."""

  def __init__(self, name: str, total: int | None, stream, start: int = 0, every_s: float = 5.0):
    self.name, self.total, self.stream, self.every_s = name, total, stream, every_s
    self.done, self.start = start, start
    self.tty = getattr(stream, "isatty", lambda: False)()
    self._t0 = self._last = time.perf_counter()
    self.active = on_main_process()
    if start:
      self._print(f"resuming at {start / 2**20:.1f} MiB")

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if now - self._last >= (0.2 if self.tty else self.every_s):
      self._last = now
      self._print()

  def close(self) -> None:
    self._print("done")
    if self.tty and self.active:
      self.stream.write("\n")

  def _print(self, note: str = "") -> None:
    if not self.active:
      return
    elapsed = max(time.perf_counter() - self._t0, 1e-9)
    rate = (self.done - self.start) / elapsed
    of = f" of {self.total / 2**20:.1f}" if self.total else ""
    eta = ""
    if self.total and rate > 0 and self.done < self.total:
      eta = f"  ETA {hms((self.total - self.done) / rate)}"
    line = f"downloading {self.name}  {self.done / 2**20:.1f}{of} MiB  {rate / 2**20:.1f} MiB/s{eta}  {note}".rstrip()
    self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
    self.stream.flush()

