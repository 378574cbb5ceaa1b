"""Class-per-folder image trees decoded to uint8 arrays (the layout CINIC-10 and Tiny ImageNet unpack to).

`read_tree(root, image_size, test_split)` reads `root/train/<class>/**` and
`root/<test_split>/<class>/**` (JPEG or PNG, any mode PIL reads, converted to
RGB; images may sit in sub-folders of a class folder). A split folder without
class folders but with a `val_annotations.txt` (file, class per line: Tiny
ImageNet's val/) is labelled from it. `root/valid/` or `root/val/` (when not
the test split) is the validation split. It returns
`({split: (images_NxHxWx3, labels_N)}, class_names)`; `eejax.data` wraps them.
"""
import concurrent.futures
import os
import sys
import time

import numpy as np

from eejax.errors import UserError
from eejax.writers import hms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def read_tree(root: str, image_size, test_split: str = "test", keep: tuple[int, int] = (0, 0)):
  """See the module docstring; keep=(n, seed) with n > 0 decodes only `data.subset`'s choice of n per split."""
  if not os.path.isdir(os.path.join(root, "train")) or not os.path.isdir(os.path.join(root, test_split)):
    raise UserError(
        f"data folder {root!r} not found or incomplete: expected {root}/train/<class>/*.jpg|png and "
        f"{root}/{test_split}/<class>/*.jpg|png; set --config.data.source=folder:PATH or tfds:NAME")
  class_names = tuple(sorted(d for d in os.listdir(os.path.join(root, "train"))
                             if os.path.isdir(os.path.join(root, "train", d))))
  if not class_names:
    raise UserError(f"{root}/train holds no class folders: expected {root}/train/<class>/*.jpg|png")
  splits = {"train": read_split(root, "train", class_names, image_size, keep),
            "test": read_split(root, test_split, class_names, image_size, keep)}
  for name in ("valid", "val"):
    if name != test_split and os.path.isdir(os.path.join(root, name)):
      splits["val"] = read_split(root, name, class_names, image_size, keep)
      break
  return splits, class_names


def images_under(folder: str) -> list[str]:
  """Every image file under `folder`, sub-folders included, in sorted order."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames.sort()
    found += [os.path.join(dirpath, n) for n in sorted(filenames) if n.lower().endswith(IMAGE_EXTENSIONS)]
  return found


def _annotated_split(root, split, class_names):
  """(paths, labels) of a split labelled by val_annotations.txt (file<TAB>class...), or None."""
  annotations = os.path.join(root, split, "val_annotations.txt")
  if not os.path.exists(annotations):
    return None
  index = {name: i for i, name in enumerate(class_names)}
  by_name = {os.path.basename(p): p for p in images_under(os.path.join(root, split))}
  paths, labels = [], []
  with open(annotations, encoding="utf-8") as f:
    for line in f:
      name, cls = line.split("\t")[:2]
      if name in by_name and cls in index:
        paths.append(by_name[name])
        labels.append(index[cls])
  return paths, labels


def read_split(root, split, class_names, image_size, keep=(0, 0)):
  """(images_NxHxWx3 uint8, labels_N int32) of `root/split`, with a progress line while decoding.

  keep=(n, seed), n > 0: only the n images a seeded permutation picks (`chosen`), in their order.
  """
  paths, labels = [], []
  annotated = None if os.path.isdir(os.path.join(root, split, class_names[0])) else _annotated_split(
      root, split, class_names)
  if annotated:
    paths, labels = annotated
  for label, cls in enumerate(class_names if not annotated else ()):
    folder = os.path.join(root, split, cls)
    if not os.path.isdir(folder):
      raise UserError(f"{folder} is missing: every class in {root}/train must also be in {root}/{split}")
    names = images_under(folder)
    paths += names
    labels += [label] * len(names)
  if not paths:
    raise UserError(f"no .jpg/.png images under {root}/{split}/<class>/")
  if keep[0]:
    idx = chosen(len(paths), *keep)
    paths, labels = [paths[i] for i in idx], [labels[i] for i in idx]
  count = Count(f"decoding {root}/{split}", len(paths))
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    images = [count.tick(image) for image in pool.map(lambda p: decode(p, image_size), paths, chunksize=256)]
  count.close()
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise UserError(f"images under {root}/{split} have different sizes {sorted(shapes)[:3]}...; "
                    "set --config.data.image_size=N to resize them all to NxN")
  return np.stack(images), np.asarray(labels, np.int32)


def chosen(total: int, n: int, seed: int) -> np.ndarray:
  """The sorted indices of at most n of `total` items, by a permutation of `seed` (all when n >= total)."""
  if n >= total:
    return np.arange(total)
  return np.sort(np.random.default_rng(seed).permutation(total)[:n])


def decode(path, image_size) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    im = im.convert("RGB")
    if image_size and im.size != (image_size, image_size):
      im = im.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(im, np.uint8)


def resize(images_NxHxWx3: np.ndarray, image_size) -> np.ndarray:
  """Every image resized (bilinear) to image_size x image_size; unchanged when None or already that size."""
  if not image_size or images_NxHxWx3.shape[1:3] == (image_size, image_size):
    return images_NxHxWx3
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR))
                   for im in images_NxHxWx3])


class Count:
  """`decoding PATH: 12,000 of 50,000 images (24%) ETA 0m41s`, printed every 10 s (only for long work)."""

  def __init__(self, what: str, total: int, every_s: float = 10.0, stream=None):
    self.what, self.total, self.every_s, self.done = what, total, every_s, 0
    self.stream = stream or sys.stderr
    self._t0 = self._last = time.perf_counter()
    self.printed = False

  def tick(self, item):
    self.done += 1
    now = time.perf_counter()
    if now - self._last >= self.every_s:
      self._last = now
      rate = self.done / (now - self._t0)
      self.stream.write(f"{self.what}: {self.done:,} of {self.total:,} images ({100 * self.done / self.total:.0f}%) "
                        f"ETA {hms((self.total - self.done) / rate)}\n")
      self.stream.flush()
      self.printed = True
    return item

  def close(self) -> None:
    if self.printed:
      self.stream.write(f"{self.what}: {self.total:,} images in {time.perf_counter() - self._t0:.0f} s\n")
