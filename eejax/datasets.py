"""The datasets the papers use, read from their authors' original files, without TensorFlow.

`data.source` names one of `BUILTIN` (cifar10, cifar100, svhn, tiny_imagenet,
cinic10). On first use its files are downloaded into `<cache_dir>/downloads`
(`eejax.download`: progress, resume, the published MD5 checked), archives of
image trees are unpacked once into `<cache_dir>/extracted`, and `eejax.data`
caches the decoded arrays as for every source. `NAME:PATH` reads a copy the
user already has instead: the original file itself, or a folder holding the
original file(s) under their original names. `data.mirror` (a base URL) fetches
the same file names from elsewhere.

What each reader returns is what the original gives: CIFAR-100's 100 fine
labels in its own order, SVHN's label 10 read as the digit 0, Tiny ImageNet's
val/ (labelled by val_annotations.txt) as the test split (its test/ has no
labels), CINIC-10's valid/ as the validation split.
"""
import dataclasses
import os
import pickle
import tarfile
from typing import Callable

import numpy as np

from eejax import download, folders
from eejax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Remote:
  filename: str
  url: str
  md5: str  # as its publishers give it


@dataclasses.dataclass(frozen=True)
class Builtin:
  name: str
  homepage: str
  files: tuple[Remote, ...]
  read: Callable | None  # {filename: path} -> ({split: (images, labels)}, class_names); None: an image tree
  test_split: str = "test"  # image trees: the folder of the labelled evaluation split


def _cifar(labels_key: bytes, names_key: bytes, meta: str):
  def read(paths):
    (archive,) = paths.values()
    batches, test, names = [], None, None
    with tarfile.open(archive) as t:
      for member in sorted(t.getmembers(), key=lambda m: m.name):
        base = os.path.basename(member.name)
        if base.startswith("data_batch_") or base == "train":
          batches.append(_unpickle(t, member))
        elif base in ("test_batch", "test"):
          test = _unpickle(t, member)
        elif base == meta:
          names = tuple(n.decode() for n in _unpickle(t, member)[names_key])
    if not batches or test is None or names is None:
      raise UserError(f"{archive} lacks the training, test or meta pickles of the original archive")
    arrays = lambda ds: (np.concatenate([d[b"data"] for d in ds]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
                         np.concatenate([np.asarray(d[labels_key], np.int32) for d in ds]))
    return {"train": arrays(batches), "test": arrays([test])}, names
  return read


def _unpickle(t: tarfile.TarFile, member) -> dict:
  return pickle.load(t.extractfile(member), encoding="bytes")


def _read_svhn(paths):
  import scipy.io  # pylint: disable=g-import-not-at-top  (a dependency of jax)
  def split(path):
    mat = scipy.io.loadmat(path)
    return np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2), np.uint8), mat["y"].reshape(-1).astype(np.int32) % 10
  return ({"train": split(paths["train_32x32.mat"]), "test": split(paths["test_32x32.mat"])},
          tuple(str(d) for d in range(10)))


CIFAR = "https://www.cs.toronto.edu/~kriz/"
SVHN = "http://ufldl.stanford.edu/housenumbers/"
BUILTIN = {b.name: b for b in (
    Builtin("cifar10", CIFAR + "cifar.html",
            (Remote("cifar-10-python.tar.gz", CIFAR + "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
            _cifar(b"labels", b"label_names", "batches.meta")),
    Builtin("cifar100", CIFAR + "cifar.html",
            (Remote("cifar-100-python.tar.gz", CIFAR + "cifar-100-python.tar.gz",
                    "eb9058c3a382ffc7106e4002c42a8d85"),),
            _cifar(b"fine_labels", b"fine_label_names", "meta")),
    Builtin("svhn", SVHN,
            (Remote("train_32x32.mat", SVHN + "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
             Remote("test_32x32.mat", SVHN + "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")),
            _read_svhn),
    Builtin("tiny_imagenet", "http://cs231n.stanford.edu/",
            (Remote("tiny-imagenet-200.zip", "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                    "90528d7ca1a48142e341f4ef8d21d0de"),),
            None, test_split="val"),
    Builtin("cinic10", "https://github.com/BayesWatch/cinic-10",
            (Remote("CINIC-10.tar.gz", "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz",
                    "6ee4d0c996905fe93221de577967a372"),),
            None),
)}


def cache_key(spec: Builtin, image_size) -> str:
  """The decoded arrays depend on the files' contents (their MD5s) and the size only, not on where they came from."""
  return f"{spec.name}:{','.join(r.md5 for r in spec.files)}:{image_size}"


def read(spec: Builtin, local: str, cache_dir: str, mirror: str = "", image_size=None):
  """({split: (images_NxHxWx3, labels_N)}, class_names) of a built-in dataset; see the module docstring."""
  paths = files(spec, local, cache_dir, mirror)
  if spec.read is None:
    (archive,) = paths.values()
    tree = download.extract(archive, os.path.join(cache_dir, "extracted", f"{spec.name}-{spec.files[0].md5[:8]}"))
    return folders.read_tree(_tree_root(tree), image_size, spec.test_split)
  try:
    splits, names = spec.read(paths)
  except (tarfile.TarError, pickle.UnpicklingError, EOFError, KeyError, ValueError, OSError) as e:
    raise UserError(f"could not read {spec.name} from {', '.join(paths.values())} ({e.__class__.__name__}: {e}); "
                    "delete the file(s) and run again") from None
  return {s: (folders.resize(images, image_size), labels) for s, (images, labels) in splits.items()}, names


def files(spec: Builtin, local: str, cache_dir: str, mirror: str = "") -> dict[str, str]:
  """{filename: path} of verified copies: the user's (`local`: a file or a folder), else downloaded."""
  if local:
    local = os.path.expanduser(local)
    paths = {r.filename: local if os.path.isfile(local) and len(spec.files) == 1 else os.path.join(local, r.filename)
             for r in spec.files}
    for r in spec.files:
      if not os.path.isfile(paths[r.filename]):
        missing = local if not os.path.exists(local) else paths[r.filename]  # not FILE/name of a FILE not there
        raise UserError(f"data.source={spec.name}:{local}: {missing} not found; give the original "
                        f"{' and '.join(f.filename for f in spec.files)} (from {spec.homepage}), or a folder holding "
                        f"{'them' if len(spec.files) > 1 else 'it'}")
      download.verify(paths[r.filename], r.md5, f"data.source={spec.name}:")
    return paths
  where = os.path.join(cache_dir, "downloads")
  return {r.filename: download.fetch(_url(r, mirror), os.path.join(where, r.filename), r.md5, remedy=remedy(spec))
          for r in spec.files}


def _url(remote: Remote, mirror: str) -> str:
  return f"{mirror.rstrip('/')}/{remote.filename}" if mirror else remote.url


def remedy(spec: Builtin) -> str:
  names = " and ".join(r.filename for r in spec.files)
  where = "/path/to/" + (spec.files[0].filename if len(spec.files) == 1 else "folder")
  return (f"Without network: download {names} from {spec.homepage} elsewhere and give "
          f"--config.data.source={spec.name}:{where}, or a class-per-folder copy with "
          "--config.data.source=folder:PATH")


def _tree_root(tree: str) -> str:
  """The folder holding train/ in an unpacked archive: the archive's top folder, or one level below it."""
  if os.path.isdir(os.path.join(tree, "train")):
    return tree
  for name in sorted(os.listdir(tree)):
    if os.path.isdir(os.path.join(tree, name, "train")):
      return os.path.join(tree, name)
  raise UserError(f"{tree} (unpacked) has no train/ folder: the archive is not the original one; delete "
                  f"{tree} and the archive and run again")
