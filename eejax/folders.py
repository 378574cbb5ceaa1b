"""Class-per-folder image trees decoded to uint8 arrays (the layout CINIC-10 and Tiny ImageNet unpack to).

`read_tree(root, image_size, test_split)` reads `root/train/<class>/**` and
`root/<test_split>/<class>/**` (JPEG or PNG, any mode PIL reads, converted to
8-bit RGB by `to_rgb`; images may sit in sub-folders of a class folder). A file
that cannot be decoded (corrupt, truncated, empty, not an image, a dangling
link, unreadable) is left out with one warning that counts and names them; a
split with no readable image, a class of the test split that training never
saw, or images lying directly in train/ stop with one line. A split folder without
class folders but with a `val_annotations.txt` (file, class per line: Tiny
ImageNet's val/) is labelled from it; a line that is not file<TAB>class or
names a class training never saw stops with one line. `root/valid/` or `root/val/` (when not
the test split) is the validation split. It returns
`({split: (images_NxHxWx3, labels_N)}, class_names)`; `eejax.data` wraps them.
"""
import concurrent.futures
import os
import sys
import warnings

import numpy as np

from eejax.errors import UserError
from eejax.writers import Count, say

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
    loose = " but image files directly in it" if images_under(os.path.join(root, "train")) else ""
    raise UserError(f"{root}/train holds no class folders{loose}: put each class's images in "
                    f"{root}/train/<class>/ (the folder's name is the label)")
  test_only = sorted(set(_class_folders(os.path.join(root, test_split))) - set(class_names))
  if test_only:
    raise UserError(f"class folder(s) {', '.join(test_only)} in {root}/{test_split} are not in {root}/train: a "
                    f"class the model never trains on cannot be tested; add its training images or remove it")
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
  """(paths, labels) of a split labelled by val_annotations.txt (file<TAB>class..., a line per image), or None.

  A line that is not file<TAB>class, or a class training never saw, stops with one line; a listed file that is not
  there is left out with the warning of a file that cannot be read.
  """
  annotations = os.path.join(root, split, "val_annotations.txt")
  if not os.path.exists(annotations):
    return None
  index = {name: i for i, name in enumerate(class_names)}
  by_name = {os.path.basename(p): p for p in images_under(os.path.join(root, split))}
  paths, labels = [], []
  with open(annotations, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.rstrip("\r\n").split("\t")
      where = f"{annotations}, line {number}"
      if len(fields) < 2 or not fields[0] or not fields[1]:
        raise UserError(f"{where}: {line.strip()[:80]!r} is not FILE<TAB>CLASS; fix the line, or unpack the "
                        "dataset's archive again")
      if fields[1] not in index:
        raise UserError(f"{where}: class {fields[1]!r} is not in {root}/train: a class the model never trains on "
                        "cannot be tested; add its training images or remove its lines")
      paths.append(by_name.get(fields[0], os.path.join(root, split, "images", fields[0])))
      labels.append(index[fields[1]])
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
    decoded = [count.tick(out) for out in pool.map(lambda p: _try_decode(p, image_size), paths, chunksize=256)]
  count.close()
  bad = [(path, why) for path, (image, why) in zip(paths, decoded) if image is None]
  if bad:
    _warn_skipped(bad, f"{root}/{split}", len(paths))
  images = [image for image, _ in decoded if image is not None]
  labels = [label for label, (image, _) in zip(labels, decoded) if image is not None]
  if not images:
    raise UserError(f"no image under {root}/{split} could be decoded: {bad[0][0]} ({bad[0][1]}), ...")
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
  """HxWx3 uint8 of any image PIL reads (see `to_rgb`), resized (bilinear) to image_size x image_size if given."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    rgb = to_rgb(im)
  if image_size and rgb.shape[:2] != (image_size, image_size):
    rgb = np.asarray(Image.fromarray(rgb).resize((image_size, image_size), Image.BILINEAR), np.uint8)
  return rgb


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how older PIL opens a 16-bit greyscale PNG


def to_rgb(im) -> np.ndarray:
  """HxWx3 uint8 of a PIL image of any mode.

  16-bit greyscale is scaled to 8 bits (v / 257, rounded: 65535 -> 255), not clipped as PIL's convert does;
  floating-point greyscale is read as 0..255; palette images are looked up in their palette; RGBA and LA
  keep their colour (alpha dropped); CMYK becomes (255 - C)(255 - K) / 255 per channel; bilevel 0/255.
  """
  if im.mode in SIXTEEN_BIT or im.mode == "F":
    v = np.asarray(im).astype(np.float64)
    grey = np.clip(np.round(v / 257.0 if im.mode in SIXTEEN_BIT else v), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  with warnings.catch_warnings():  # "palette images with transparency ... should be converted to RGBA": we do RGB
    warnings.simplefilter("ignore")
    return np.asarray(im.convert("RGB"), np.uint8)


def _try_decode(path, image_size):
  """(image, None), or (None, why) for a file that is not a readable image."""
  try:
    return decode(path, image_size), None
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types for a bad file
    if isinstance(e, FileNotFoundError) and os.path.islink(path):
      return None, "a link to nothing"
    return None, (getattr(e, "strerror", None) or str(e).split(" '")[0] or e.__class__.__name__)[:80]


def _warn_skipped(bad, where: str, total: int) -> None:
  names = "; ".join(f"{os.path.relpath(p, where)} ({why})" for p, why in bad[:5])
  more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
  say(f"warning: {len(bad)} of {total:,} files under {where} are not readable images and are left out: "
      f"{names}{more}", sys.stderr)


def _class_folders(split_root: str) -> list[str]:
  """The class folders of a split (none for one labelled by val_annotations.txt)."""
  if not os.path.isdir(split_root) or os.path.exists(os.path.join(split_root, "val_annotations.txt")):
    return []
  return [d for d in os.listdir(split_root) if os.path.isdir(os.path.join(split_root, d))]


def resize(images_NxHxWx3: np.ndarray, image_size) -> np.ndarray:
  """Every image resized (bilinear) to image_size x image_size; unchanged when None or already that size."""
  if not image_size or images_NxHxWx3.shape[1:3] == (image_size, image_size):
    return images_NxHxWx3
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR))
                   for im in images_NxHxWx3])


