"""What guards a workdir: one job at a time (a lock), one run for its whole life (its identity), its JSON files read
with one clear line when damaged, and the paths a job is given checked before anything is written.

lock: `fcntl.flock` on WORKDIR/.lock for as long as a job runs. The OS drops it when the process ends, however it
ends, so a crashed or killed run never leaves it stuck; a second job in the same workdir meets one line naming
the first one's process id and host. Linux's NFS client carries flock to the server (NFSv4, or NFSv3 with its
lock manager); Lustre does only when mounted with `-o flock`, and without it a warning says that nothing guards
the workdir.

identity: WORKDIR/identity.json, written before anything else of a new run: the scheme, the seed, the model's
settings and classes, the data's split settings and a fingerprint of the training images and labels (the path of
the data is kept for the message only: a dataset moved elsewhere is the same dataset). A job whose identity
differs is refused, naming both values of each difference, before anything in the workdir is touched.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from eejax import collectives
from eejax.errors import UserError
from eejax.writers import on_main_process

IDENTITY = "identity.json"
DATA_KEYS = ("image_size", "max_images", "val_size", "val_seed", "test_split")
# Settings (dotted prefixes) that change how a job runs or where it finds its inputs, never what it computes: the
# data is known by its fingerprint, a teacher or backbone by its path (it may move, and each seed may have its own).
RUNS_ANY_WAY = ("data.source", "data.mirror", "data.cache_dir", "data.tfds_data_dir", "data.download",
                "compile_cache_dir", "compile_cache_max_gb", "distributed", "train.steps_per_call",
                "train.transfer_guard", "erde.teacher", "ic_only.backbone", "bts.backbone", "checkpoint.", "log.",
                "eval.batch_size", "eval.real_inference")
SECTION_SCHEMES = {"erde": "erde", "mate": "mate", "byot": "byot", "sdn": "sdn", "ic_only": "ic_only",
                   "bts": "boosted"}  # a config section read by one scheme alone


def not_a_run(workdir: str) -> UserError:
  """The line for a --workdir that holds no run; a BTS-EE job's folder names the runs inside it."""
  models = os.path.join(workdir, "models")
  inside = sorted(d for d in os.listdir(models) if os.path.exists(os.path.join(models, d, "run.json"))
                  ) if os.path.isdir(models) else []
  if inside:
    return UserError(f"{workdir!r} is a BTS-EE job, whose models are runs of their own: give "
                     f"{models}/NAME, NAME one of {', '.join(inside)}")
  return UserError(f"{workdir!r} is not an eejax workdir (no config.json and run.json); give a run's workdir")


def check_path(path: str, what: str, flag: str) -> None:
  """One line when `path` cannot be a folder this job writes: it is a file, or a folder it cannot write."""
  path = os.path.expanduser(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag}={path} is a file, not a folder: give the {what} a folder's path (new or existing)")
  existing = path
  while existing and not os.path.exists(existing):
    existing = os.path.dirname(existing.rstrip(os.sep))
  existing = existing or "."
  if not os.path.isdir(existing):
    raise UserError(f"{flag}={path}: {existing} is a file, so the {what} cannot be made there")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"{flag}={path}: {existing} is not writable (read-only or another user's); give the {what} "
                    f"a folder you can write")


@contextlib.contextmanager
def lock(workdir: str):
  """Holds WORKDIR/.lock while the block runs (taken by process 0 of a multi-process job; every process stops
  when it is held by another job). A file system without locks (Lustre mounted without `flock`) gets a warning."""
  fd, problem = None, None
  if on_main_process():
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    problem = _take(fd, workdir)
  try:
    collectives.agree(problem)
    if fd is not None:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    yield
  finally:
    if fd is not None:
      os.close(fd)  # releases the lock


def _take(fd: int, workdir: str) -> str | None:
  """None once this process holds the lock on `fd` (or the file system has none), else why not."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EAGAIN, errno.EACCES):
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
      return (f"{workdir} is in use by another eejax job (process {holder}); wait for it to end, or give this one "
              f"another --workdir")
    if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
      os.close(fd)
      raise
    print(f"warning: the file system of {workdir} does not support locks ({e.strerror}): a second job started "
          f"in this workdir while this one runs would not be stopped", file=sys.stderr)
  return None


def check_shared(workdir: str) -> None:
  """One line on every process when the processes do not see one --workdir (each host its own /tmp, say): every
  process writes a file there, and each must see all of them. Nothing is left behind."""
  if jax.process_count() == 1:
    return
  token = int(multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(4), np.uint32)[0]))
  names = [f".job-{token}-process-{i}" for i in range(jax.process_count())]
  mine = os.path.join(workdir, names[jax.process_index()])
  os.makedirs(workdir, exist_ok=True)
  with open(mine, "w", encoding="utf-8") as f:
    f.write(f"{os.getpid()}\n")
  try:
    collectives.barrier("eejax_check_shared_workdir")
    unseen = [i for i, name in enumerate(names) if not os.path.exists(os.path.join(workdir, name))]
    collectives.agree(None if not unseen else (
        f"--workdir={workdir} is not one folder that every process shares: process {jax.process_index()} does "
        f"not see the files that process(es) {', '.join(map(str, unseen))} wrote there. Give a --workdir on a file "
        f"system that every host mounts (NFS, Lustre, a bucket): all processes save into one checkpoint"))
  finally:
    os.remove(mine)


def fingerprint(images_NxHxWx3: np.ndarray, labels_N: np.ndarray) -> str:
  """SHA-256 of the training images and labels as the run sees them (after decoding, resizing, subsetting)."""
  h = hashlib.sha256()
  for a in (np.ascontiguousarray(images_NxHxWx3), np.ascontiguousarray(labels_N)):
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()


def identity(config, model_settings: dict, num_classes: int, train_fingerprint: str) -> dict:
  return {"scheme": config.scheme, "seed": int(config.seed), "init": config.train.init, "model": model_settings,
          "num_classes": int(num_classes),
          "data": {k: config.data[k] for k in DATA_KEYS}, "data_fingerprint": train_fingerprint,
          "data_source": config.data.source}


def check_identity(workdir: str, mine: dict) -> None:
  """Refuses a job that is not the run `workdir` holds; records `mine` when the workdir holds no run yet."""
  path = os.path.join(workdir, IDENTITY)
  theirs = read_json(path) if os.path.exists(path) else _older_identity(workdir)
  if theirs is not None:
    what = differences(theirs, mine)
    if what:
      raise UserError(f"{workdir} holds another run ({what}). Nothing in it was changed: give this run a new "
                      f"--workdir, or the settings of the run there to resume it")
  if on_main_process() and not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    write_json(path, mine)


def _older_identity(workdir: str) -> dict | None:
  """What a workdir written before identity.json says of its run (its config.json), without a data fingerprint."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  config = read_json(path)
  model = config.get("model", {})
  return {"scheme": config.get("scheme"), "seed": config.get("seed"),
          "model": {"arch": model.get("name"), "width": model.get("width"), "head": model.get("head")},
          "data": {k: config.get("data", {}).get(k) for k in DATA_KEYS}}


def differences(theirs: dict, mine: dict, compared=lambda key: True, words=("there", "here")) -> str:
  """'key: X there, Y here; ...' for the leaves (dotted keys) both trees hold that differ, at most four; '' if none."""
  known = set(_keys(theirs))
  found = [f"{key}: {_show(theirs, key)} {words[0]}, {_show(mine, key)} {words[1]}" for key in _keys(mine)
           if compared(key) and key in known and _get(theirs, key) != _get(mine, key)]
  return "; ".join(found[:4]) + ("; ..." if len(found) > 4 else "")


def shapes_result(key: str, scheme: str, free: tuple = RUNS_ANY_WAY) -> bool:
  """Whether the setting `key` (dotted) bears on what a run of `scheme` trains and reports, the prefixes in `free`
  aside; another scheme's section never does."""
  section = key.split(".")[0]
  return not (key.startswith(free) or SECTION_SCHEMES.get(section, scheme) != scheme)


def _keys(tree: dict, prefix: str = "") -> list[str]:
  out = []
  for k, v in tree.items():
    if k == "data_source":
      continue
    out += _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
  return out


def _get(tree: dict, key: str):
  for part in key.split("."):
    tree = tree[part]
  return tree


def _show(tree: dict, key: str) -> str:
  if key == "data_fingerprint":
    return f"data {tree.get('data_source', '?')} (fingerprint {tree[key][:12]})"
  value = _get(tree, key)
  return "null" if value is None else json.dumps(value)


def as_tree(config) -> dict:
  """A ConfigDict as the plain JSON tree config.json holds."""
  return json.loads(config.to_json_best_effort())


def save_config(workdir: str, config) -> None:
  """WORKDIR/config.json: the settings that made the run."""
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, "config.json"), as_tree(config), indent=2)


def read_json(path: str):
  """A workdir's JSON file, or one line that names it when it is unreadable or damaged."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise UserError(f"{path} is damaged ({e.__class__.__name__}: {e}); restore it from a copy, or rerun the job "
                    f"that writes it") from None
  except OSError as e:
    raise UserError(f"cannot read {path} ({e.strerror or e})") from None


def write_json(path: str, value, indent=1, default=None) -> None:
  """Writes whole or not at all (`write_text`); `default` as json.dumps takes it."""
  write_text(path, json.dumps(value, indent=indent, default=default))


def read_npz(path: str, names=()) -> dict:
  """The arrays of a workdir's .npz file (logits.npz), or one line that names it when it is unreadable, damaged
  (a file cut short) or lacks one of `names`."""
  try:
    with np.load(path) as saved:
      arrays = {name: saved[name] for name in saved.files}
  except FileNotFoundError:
    raise UserError(f"{path} is missing: a finished run writes it after training; wait for the job training it, or "
                    "run the training command again (it evaluates the last checkpoint)") from None
  except OSError as e:
    raise UserError(f"cannot read {path} ({e.strerror or e})") from None
  except Exception as e:  # pylint: disable=broad-except  # zipfile.BadZipFile, ValueError, EOFError: damaged
    raise UserError(f"{path} is damaged ({e.__class__.__name__}: {e}); run the training command again: it "
                    f"evaluates the last checkpoint and writes it anew") from None
  missing = [name for name in names if name not in arrays]
  if missing:
    raise UserError(f"{path} lacks {', '.join(missing)}: not the logits.npz of an eejax run")
  return arrays


@contextlib.contextmanager
def replacing(path: str):
  """A temporary path beside `path` (same extension) to write to; renamed onto `path` when the block ends cleanly,
  removed when it does not (an error, Ctrl-C): the file appears whole or not at all, never half written."""
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{os.getpid()}{ext}"
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_npz(path: str, **arrays) -> None:
  """np.savez, whole or not at all."""
  with replacing(path) as tmp:
    np.savez(tmp, **arrays)


def write_text(path: str, text: str) -> None:
  """Writes whole or not at all."""
  with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def write_bytes(path: str, data: bytes) -> None:
  """Writes whole or not at all (an exported model)."""
  with replacing(path) as tmp, open(tmp, "wb") as f:
    f.write(data)
