"""Downloads against a local HTTP server: progress, resume, checksum, atomic extraction, clear errors."""
import hashlib
import io
import os
import tarfile
import time

import numpy as np
import pytest

from eejax import download
from eejax.errors import UserError
from http_server import closed_port_url, serve

BODY = np.random.default_rng(0).integers(0, 256, 3 * download.CHUNK_BYTES + 12345, dtype=np.uint8).tobytes()
MD5 = hashlib.md5(BODY).hexdigest()


def test_a_download_arrives_whole_verified_and_with_progress(tmp_path):
  out = io.StringIO()
  with serve({"a.bin": BODY}) as (url, log):
    path = download.fetch(f"{url}/a.bin", str(tmp_path / "d" / "a.bin"), MD5, stream=out)
  assert open(path, "rb").read() == BODY
  assert sorted(os.listdir(tmp_path / "d")) == ["a.bin", "a.bin.lock"]  # no .part left
  assert log == [("a.bin", None)]
  lines = out.getvalue().splitlines()
  assert "downloading a.bin" in lines[-1] and "of 3.0 MiB" in lines[-1] and "MiB/s" in lines[-1]
  assert download.fetch(f"{url}/a.bin", path, MD5) == path  # present: nothing fetched again


def test_a_connection_dropped_mid_file_resumes_where_it_stopped(tmp_path):
  half = len(BODY) // 2
  with serve({"a.bin": BODY}, drop_first_after=half) as (url, log):
    path = download.fetch(f"{url}/a.bin", str(tmp_path / "a.bin"), MD5, stream=io.StringIO())
  assert open(path, "rb").read() == BODY
  assert log[0] == ("a.bin", None) and log[1] == ("a.bin", f"bytes={half}-") and len(log) == 2


def test_a_part_left_by_an_earlier_call_is_continued(tmp_path):
  third = len(BODY) // 3
  (tmp_path / "a.bin.part").write_bytes(BODY[:third])
  out = io.StringIO()
  with serve({"a.bin": BODY}) as (url, log):
    download.fetch(f"{url}/a.bin", str(tmp_path / "a.bin"), MD5, stream=out)
  assert (tmp_path / "a.bin").read_bytes() == BODY
  assert log == [("a.bin", f"bytes={third}-")]
  assert "resuming at 1.0 MiB" in out.getvalue()


def test_a_wrong_checksum_is_one_error_and_leaves_no_file(tmp_path):
  with serve({"a.bin": BODY[:-1] + b"x"}) as (url, _):
    with pytest.raises(UserError, match=f"wrong MD5 \\(expected {MD5}\\); the file was deleted"):
      download.fetch(f"{url}/a.bin", str(tmp_path / "a.bin"), MD5, stream=io.StringIO())
  assert os.listdir(tmp_path) == ["a.bin.lock"]


def test_no_server_or_a_missing_file_is_one_error_within_seconds(tmp_path):
  start = time.perf_counter()
  with pytest.raises(UserError, match="could not download .*no connection.*Try this"):
    download.fetch(f"{closed_port_url()}/a.bin", str(tmp_path / "a.bin"), MD5, remedy="Try this.")
  assert time.perf_counter() - start < 5
  with serve({}) as (url, _):
    with pytest.raises(UserError, match="the server answered 404"):
      download.fetch(f"{url}/a.bin", str(tmp_path / "a.bin"), MD5)
  assert not os.path.exists(tmp_path / "a.bin")


def test_extraction_is_all_or_nothing(tmp_path):
  archive = tmp_path / "t.tar.gz"
  with tarfile.open(archive, "w:gz") as t:
    info = tarfile.TarInfo("top/train/x.txt")
    info.size = 5
    t.addfile(info, io.BytesIO(b"hello"))
  dest = download.extract(str(archive), str(tmp_path / "out"))
  assert open(os.path.join(dest, "top", "train", "x.txt")).read() == "hello"
  broken = tmp_path / "b.tar.gz"
  broken.write_bytes(archive.read_bytes()[:40])
  with pytest.raises(UserError, match="could not unpack"):
    download.extract(str(broken), str(tmp_path / "out2"))
  assert sorted(os.listdir(tmp_path)) == ["b.tar.gz", "out", "t.tar.gz"]  # no half folder
