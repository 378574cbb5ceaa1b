"""The workdir guards: the lock, the run's identity, damaged JSON files, paths a job cannot write."""
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO
from configs import cifar10
from eejax import run, workdirs
from eejax.errors import UserError


def test_a_second_lock_is_one_line_and_a_dead_holder_never_leaves_it_stuck(tmp_path):
  workdir = str(tmp_path / "w")
  with workdirs.lock(workdir):
    # another process tries while this one holds it
    code = textwrap.dedent(f"""
        from eejax import workdirs
        from eejax.errors import UserError
        try:
          with workdirs.lock({workdir!r}):
            print("got it")
        except UserError as e:
          print(e)""")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert f"in use by another eejax job (process {os.getpid()} on {socket.gethostname()})" in out
  # a holder killed with SIGKILL: the OS drops the lock with the process
  holder = subprocess.Popen([sys.executable, "-c", f"from eejax import workdirs\nimport time\n"
                             f"with workdirs.lock({workdir!r}):\n  print('held', flush=True); time.sleep(60)"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  holder.kill()
  holder.wait()
  with workdirs.lock(workdir):
    pass


def test_a_file_system_without_locks_warns_and_other_lock_errors_are_not_hidden(tmp_path, monkeypatch, capsys):
  def no_locks(fd, op):
    raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre mounted without -o flock
  monkeypatch.setattr(workdirs.fcntl, "flock", no_locks)
  with workdirs.lock(str(tmp_path)):
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()} on {socket.gethostname()}\n"
  assert "does not support locks (Function not implemented)" in capsys.readouterr().err

  def broken(fd, op):
    raise OSError(errno.EIO, "Input/output error")
  monkeypatch.setattr(workdirs.fcntl, "flock", broken)
  with pytest.raises(OSError, match="Input/output error"):
    with workdirs.lock(str(tmp_path)):
      pass


def _identity(config, fingerprint="f" * 64):
  return workdirs.identity(config, run.model_settings(config.model), 3, fingerprint)


def test_identity_is_recorded_once_and_another_run_is_refused_naming_both(tmp_path):
  workdir = str(tmp_path)
  config = cifar10.get_config("smoke")
  workdirs.check_identity(workdir, _identity(config))
  assert json.loads((tmp_path / workdirs.IDENTITY).read_text())["model"]["arch"] == "resnet8"
  workdirs.check_identity(workdir, _identity(config))  # the same run resumes
  moved = cifar10.get_config("smoke")
  moved.data.source = "folder:/elsewhere"  # the same images moved: the same run
  workdirs.check_identity(workdir, _identity(moved))
  other = cifar10.get_config("smoke")
  other.model.width = 0.5
  with pytest.raises(UserError, match=r"holds another run \(model.width: 0.25 there, 0.5 here\)\. Nothing in it was "
                                      r"changed"):
    workdirs.check_identity(workdir, _identity(other))
  with pytest.raises(UserError, match=r"data_fingerprint: data .* \(fingerprint ffffffffffff\) there, data .* "
                                      r"\(fingerprint 000000000000\) here"):
    workdirs.check_identity(workdir, _identity(config, "0" * 64))


def test_an_older_workdir_is_compared_through_its_config_json(tmp_path):
  config = cifar10.get_config("smoke")
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  workdirs.check_identity(str(tmp_path), _identity(config))
  os.remove(tmp_path / workdirs.IDENTITY)
  other = cifar10.get_config("smoke")
  other.model.name = "resnet20"
  with pytest.raises(UserError, match='model.arch: "resnet8" there, "resnet20" here'):
    workdirs.check_identity(str(tmp_path), _identity(other))
  assert not (tmp_path / workdirs.IDENTITY).exists()


def test_fingerprint_sees_one_pixel_and_one_label():
  images = np.zeros((4, 2, 2, 3), np.uint8)
  labels = np.arange(4, dtype=np.int32)
  base = workdirs.fingerprint(images, labels)
  images[3, 1, 1, 2] = 1
  assert workdirs.fingerprint(images, labels) != base
  images[3, 1, 1, 2] = 0
  labels[0] = 1
  assert workdirs.fingerprint(images, labels) != base


def test_damaged_json_and_unwritable_paths_are_one_line(tmp_path):
  (tmp_path / "config.json").write_text('{"model": {"name": "res')
  with pytest.raises(UserError, match=r"config.json is damaged \(JSONDecodeError"):
    workdirs.read_json(str(tmp_path / "config.json"))
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="is a file, not a folder"):
    workdirs.check_path(str(tmp_path / "file"), "workdir", "--workdir")
  with pytest.raises(UserError, match="is a file, so the workdir cannot be made there"):
    workdirs.check_path(str(tmp_path / "file" / "sub"), "workdir", "--workdir")
  workdirs.check_path(str(tmp_path / "new" / "deeper"), "workdir", "--workdir")  # made later: fine


def test_a_write_that_fails_leaves_the_previous_file_whole(tmp_path, monkeypatch):
  path = str(tmp_path / "report.json")
  workdirs.write_json(path, {"accuracy": 0.9})
  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(workdirs.os, "replace", full_disk)
  with pytest.raises(OSError):
    workdirs.write_json(path, {"accuracy": 0.1})
  assert workdirs.read_json(path) == {"accuracy": 0.9} and os.listdir(tmp_path) == ["report.json"]


def test_an_exported_model_or_figure_interrupted_mid_write_leaves_the_previous_one(tmp_path):
  path = str(tmp_path / "stage_0.tflite")
  workdirs.write_bytes(path, b"model one")
  with pytest.raises(KeyboardInterrupt):  # Ctrl-C half way through a converter writing its file
    with workdirs.replacing(path) as tmp:
      assert tmp.endswith(".tflite") and tmp != path  # the extension stays: writers that infer a format from it
      open(tmp, "wb").write(b"half")
      raise KeyboardInterrupt
  assert open(path, "rb").read() == b"model one" and os.listdir(tmp_path) == ["stage_0.tflite"]
  with workdirs.replacing(path) as tmp:
    open(tmp, "wb").write(b"model two")
  assert open(path, "rb").read() == b"model two" and os.listdir(tmp_path) == ["stage_0.tflite"]


def test_logits_are_written_whole_and_a_damaged_file_is_one_line(tmp_path, monkeypatch):
  path = str(tmp_path / "logits.npz")
  val_ExNxC = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)
  workdirs.write_npz(path, val_logits=val_ExNxC, val_labels=np.arange(5))
  saved = workdirs.read_npz(path, ("val_logits", "val_labels"))
  np.testing.assert_array_equal(saved["val_logits"], val_ExNxC)
  # A write cut short (a kill, a full disk) leaves the previous file whole and no temporary file behind.
  def cut_short(file, **arrays):
    open(file, "wb").write(b"PK\x03\x04 half a zip")
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(workdirs.np, "savez", cut_short)
  with pytest.raises(OSError):
    workdirs.write_npz(path, val_logits=val_ExNxC[:1], val_labels=np.arange(5))
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["logits.npz"]
  np.testing.assert_array_equal(workdirs.read_npz(path)["val_logits"], val_ExNxC)
  # A file cut short by an older writer, one without the arrays asked for, and none at all: one line each.
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])
  with pytest.raises(UserError, match=r"logits.npz is damaged \(.*\); run the training command again"):
    workdirs.read_npz(path)
  workdirs.write_npz(path, other=np.zeros(2))
  with pytest.raises(UserError, match="lacks test_logits: not the logits.npz of an eejax run"):
    workdirs.read_npz(path, ("other", "test_logits"))
  with pytest.raises(UserError, match="missing.npz is missing: a finished run writes it after training; wait for the "
                                      "job training it, or run the training command again"):
    workdirs.read_npz(str(tmp_path / "missing.npz"))


def test_which_settings_shape_a_runs_result():
  shapes = workdirs.shapes_result
  assert shapes("train.batch_size", "joint") and shapes("eval.budgets", "joint") and shapes("seed", "joint")
  assert not shapes("eval.batch_size", "joint") and not shapes("checkpoint.every_steps", "joint")
  assert not shapes("data.source", "joint") and shapes("data.crop_pad", "joint")
  assert shapes("bts.epochs", "boosted") and not shapes("bts.epochs", "joint") and not shapes("bts.backbone", "boosted")
  assert shapes("erde.temperature", "erde") and not shapes("erde.temperature", "mate")
  assert not shapes("erde.teacher", "erde")
  assert not shapes("train.epochs", "joint", free=("train.epochs",)) and shapes("train.epochs", "joint")
  assert workdirs.differences({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}, "d": 4, "e": 0},
                              lambda key: key != "d", words=("in R", "in S")) == "a.c: 2 in R, 5 in S"
