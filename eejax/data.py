"""Datasets as uint8 numpy arrays on the host: the papers' datasets, class-per-folder trees and tfds.

`load(source, ...)` returns a `Dataset` with train / val / test splits:

* `cifar10`, `cifar100`, `svhn`, `tiny_imagenet`, `cinic10` (`eejax.datasets`):
  read from their authors' original files, downloaded on first use (or
  `NAME:PATH`, a copy already on disk). No TensorFlow.
* `folder:PATH`: `PATH/train/<class>/**` and `PATH/<test_split>/<class>/**`
  (`eejax.folders`; JPEG or PNG, one size). The validation split is
  `PATH/valid/` or `PATH/val/` when present (and not the test split), else
  carved from train.
* `tfds:NAME`: a TensorFlow Datasets dataset already prepared in
  `data_dir` (read without TensorFlow), or downloaded and prepared on first use
  when `download=True` (that needs network access and TensorFlow).

Decoded arrays are cached in `cache_dir` so a second run does not decode again.
Everything that happens on the accelerator lives in `eejax.input_pipeline`.
"""
import dataclasses
import hashlib
import os
import socket

import numpy as np

from eejax import datasets, folders
from eejax.errors import UserError
from eejax.writers import Count

DEFAULT_CACHE = "~/.cache/eejax"


@dataclasses.dataclass(frozen=True)
class Split:
  images_NxHxWx3: np.ndarray  # uint8
  labels_N: np.ndarray  # int32

  def __len__(self):
    return len(self.labels_N)


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: Split
  val: Split
  test: Split
  class_names: tuple[str, ...]
  val_source: str  # where the validation split came from, for the report

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.train.images_NxHxWx3.shape[1:]


def load(source: str, *, val_size: int = 5000, val_seed: int = 0, image_size: int | None = None,
         cache_dir: str | None = None, tfds_data_dir: str | None = None, download: bool = False,
         max_images: int = 0, test_split: str = "test", mirror: str = "") -> Dataset:
  """Loads `source` (a built-in name, 'folder:PATH' or 'tfds:NAME'); see the module docstring.

  max_images > 0 keeps a random subset (seeded by val_seed) of at most that many
  images in every split, for quick runs; the validation split is then carved
  from the reduced train split.
  """
  kind, _, arg = source.partition(":")
  if kind in datasets.BUILTIN:
    spec = datasets.BUILTIN[kind]
    store = os.path.expanduser(cache_dir or DEFAULT_CACHE)  # downloads go there even when arrays are not cached
    read = lambda: _wrap(*datasets.read(spec, arg, store, mirror, image_size))
    splits, class_names = _cached(read, datasets.cache_key(spec, image_size), cache_dir)
  elif kind == "folder" and arg:  # a subset is chosen before decoding: a quick run decodes only what it uses
    arg = os.path.expanduser(arg)
    keep = (max_images, val_seed)
    splits, class_names = _cached(lambda: _wrap(*folders.read_tree(arg, image_size, test_split, keep)),
                                  _folder_key(arg, f"{image_size}:{test_split}:{keep if max_images else ''}"),
                                  cache_dir)
  elif kind == "tfds" and arg:
    key = f"tfds:{arg}:{tfds_data_dir}:{image_size}"
    splits, class_names = _cached(lambda: _read_tfds(arg, tfds_data_dir, download, image_size), key, cache_dir)
  else:
    check_source(source)
  if len(class_names) < 2:  # every image its one class: every exit at 100% from the first step
    raise UserError(f"data.source={source!r} holds {len(class_names)} class(es) ({', '.join(class_names)}), and a "
                    f"classifier needs two or more; for a class-per-folder tree give the folder whose train/ holds "
                    f"one folder per class")
  if max_images:
    splits = {name: subset(split, max_images, val_seed) for name, split in splits.items()}
  if "val" in splits:
    return Dataset(splits["train"], splits["val"], splits["test"], class_names, "the dataset's own validation split")
  train, val = carve_validation(splits["train"], val_size, val_seed)
  return Dataset(train, val, splits["test"], class_names, f"{len(val)} images carved from train (seed {val_seed})")


def check_source(source: str) -> None:
  """A UserError unless `source` names a built-in dataset (NAME or NAME:PATH), 'folder:PATH' or 'tfds:NAME'."""
  kind, _, arg = source.partition(":")
  if kind not in datasets.BUILTIN and not (kind in ("folder", "tfds") and arg):
    raise UserError(f"data.source={source!r}: expected one of {', '.join(datasets.BUILTIN)} (NAME or NAME:PATH "
                    "to a copy of its original files), 'folder:PATH' or 'tfds:NAME'")


def from_config(data_cfg) -> Dataset:
  """`load` with the settings of a config's `data` section."""
  return load(data_cfg.source, val_size=data_cfg.val_size, val_seed=data_cfg.val_seed,
              image_size=data_cfg.image_size, cache_dir=data_cfg.cache_dir, tfds_data_dir=data_cfg.tfds_data_dir,
              download=data_cfg.download, max_images=data_cfg.max_images, test_split=data_cfg.test_split,
              mirror=data_cfg.mirror)


def sample_images(data_cfg, n: int, split: str = "test") -> np.ndarray:
  """Up to n uint8 images of one split ("test": the evaluation split, where an export is verified; "train": the
  images an int8 export calibrates on), reading no other split; see `sample_split`."""
  return sample_split(data_cfg, n, split)[0]


def sample_split(data_cfg, n: int, split: str = "test", class_names=()):
  """(images_NxHxWx3 uint8, labels_N or None): up to n images of one split and, where known, their labels.

  A folder source decodes n files spread evenly over the split's sorted folder (so every class shows), each
  labelled by its class folder's index in `class_names` (the run's); labels are None where the run recorded no
  names or a folder is not among them. A tfds or built-in source reads that split, labels included.
  """
  kind, _, arg = data_cfg.source.partition(":")
  if kind != "folder":
    dataset = from_config(data_cfg)
    chosen = dataset.test if split == "test" else dataset.train
    return chosen.images_NxHxWx3[:n], chosen.labels_N[:n]
  folder = os.path.join(os.path.expanduser(arg), data_cfg.test_split if split == "test" else "train")
  paths = folders.images_under(folder)
  if not paths:
    use = ("the run's evaluation split, where exports are verified" if split == "test" else
           "the run's training split, where an int8 export calibrates its activation ranges: restore it there, or "
           "leave tflite_int8 out of --formats")
    raise UserError(f"no .jpg/.png images under {folder}: {use}; where the dataset moved, give its place now "
                    "(eejax.export --data=folder:PATH)")
  picks = np.linspace(0, len(paths) - 1, min(n, len(paths))).round().astype(int)
  count = Count(f"decoding {folder}", len(picks))
  images = np.stack([count.tick(folders.decode(paths[i], data_cfg.image_size)) for i in picks])
  count.close()
  index = {name: c for c, name in enumerate(class_names)}
  classes = [os.path.relpath(paths[i], folder).split(os.sep)[0] for i in picks]
  labels = np.array([index[c] for c in classes], np.int32) if all(c in index for c in classes) else None
  return images, labels


def carve_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
  """Splits `val_size` images off `train`, chosen by a fixed permutation of `seed`."""
  if not 0 < val_size < len(train):
    raise UserError(f"data.val_size={val_size} must be between 1 and {len(train) - 1} (the training set size - 1)")
  order = np.random.default_rng(seed).permutation(len(train))
  val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])
  take = lambda idx: Split(train.images_NxHxWx3[idx], train.labels_N[idx])
  return take(train_idx), take(val_idx)


def subset(split: Split, n: int, seed: int) -> Split:
  """At most n images of `split`, a seeded random choice kept in the original order (`folders.chosen`)."""
  if n >= len(split):
    return split
  idx = folders.chosen(len(split), n, seed)
  return Split(split.images_NxHxWx3[idx], split.labels_N[idx])


def _wrap(arrays, class_names):
  return {s: Split(images, labels) for s, (images, labels) in arrays.items()}, class_names


# ---------------------------------------------------------------- caching


def _cached(read, key: str, cache_dir: str | None):
  """Returns read() -> (splits, class_names), through an .npz cache keyed by `key`."""
  if not cache_dir:
    return read()
  cache_dir = os.path.expanduser(cache_dir)
  path = os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:16] + ".npz")
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        names = [str(n) for n in f["class_names"]]
        splits = {s: Split(f[f"{s}_images"], f[f"{s}_labels"]) for s in ("train", "val", "test") if f"{s}_labels" in f}
      return splits, tuple(names)
    except Exception:  # a corrupt or partial cache is rebuilt, never trusted
      os.remove(path)
  splits, class_names = read()
  os.makedirs(cache_dir, exist_ok=True)
  arrays = {"class_names": np.array(class_names)}
  for s, split in splits.items():
    arrays[f"{s}_images"], arrays[f"{s}_labels"] = split.images_NxHxWx3, split.labels_N
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return splits, class_names


def _folder_key(root: str, image_size) -> str:
  """Cache key: the tree's path, and each file's name, size, modification time, inode and change time.

  The change time (ctime) is set by the file system on every write and cannot be set back by hand (unlike the
  modification time, which `touch -r`, `cp -p` or `rsync -t` restore), so a file rewritten with the same size
  and modification time still gets a new key and the tree is decoded again.
  """
  digest = hashlib.sha256(f"{os.path.abspath(root)}:{image_size}".encode())
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    folder = os.path.relpath(dirpath, root)  # once a folder: 60,000 relpath calls took seconds
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      try:
        st = os.stat(path)
      except FileNotFoundError:  # a dangling link has no target to stat
        st = os.lstat(path)
      digest.update(f"{folder}/{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}".encode())
  return "folder:" + digest.hexdigest()


# ---------------------------------------------------------------- tfds


def _read_tfds(name, data_dir, download, image_size):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise UserError(f"tfds dataset {name!r} is unknown to tensorflow-datasets ({e.__class__.__name__})") from None
  try:
    sources = {s: tfds.data_source(name, split=s, data_dir=data_dir, download=False) for s in ("train", "test")}
  except Exception:  # not prepared, or prepared as TFRecord (no random access without TensorFlow)
    sources = _prepare_tfds(name, builder, data_dir, download)
  class_names = tuple(builder.info.features["label"].names)
  return {s: _split_from_records(src, image_size) for s, src in sources.items()}, class_names


def _prepare_tfds(name, builder, data_dir, download):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or "~/tensorflow_datasets"
  how = ("either run once with network access and TensorFlow (pip install 'eejax[tfds]') and "
         "--config.data.download=True, or give a class-per-folder copy with --config.data.source=folder:PATH")
  if not download:
    raise UserError(f"tfds dataset {name!r} is not prepared in {where} (as array_record); {how}")
  if not _online():
    raise UserError(f"tfds dataset {name!r} is not in {where} and there is no network access to download it; {how}")
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise UserError(f"preparing tfds dataset {name!r} needs TensorFlow: pip install 'eejax[tfds]'") from None
  builder.download_and_prepare(file_format="array_record")
  return {s: tfds.data_source(name, split=s, data_dir=data_dir, download=False) for s in ("train", "test")}


def _online(host="storage.googleapis.com", port=443, timeout_s=3.0) -> bool:
  """Whether the tfds download host answers within seconds (no retry loops)."""
  try:
    socket.create_connection((host, port), timeout=timeout_s).close()
    return True
  except OSError:
    return False


def _split_from_records(source, image_size) -> Split:
  images, labels = [], []
  for i in range(len(source)):
    record = source[i]
    image = np.asarray(record["image"], np.uint8)
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
    if image_size and image.shape[:2] != (image_size, image_size):
      from PIL import Image  # pylint: disable=g-import-not-at-top
      image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))
    images.append(image)
    labels.append(record["label"])
  return Split(np.stack(images), np.asarray(labels, np.int32))
