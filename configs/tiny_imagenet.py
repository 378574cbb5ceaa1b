r"""Tiny ImageNet (200 classes, 64x64) from tiny-imagenet-200.zip, for self-distillation.

The zip is downloaded and unpacked on first use (eejax.datasets); offline, give a copy with
--config.data.source=tiny_imagenet:/path/to/tiny-imagenet-200.zip (or folder:PATH, unpacked):

  python -m eejax.main --config configs/tiny_imagenet.py:mate --workdir /tmp/tin_mate
  python launch/self_distillation.py --scale gpu --config configs/tiny_imagenet.py

Layout as the archive unpacks: train/<wnid>/images/*.JPEG, val/images/*.JPEG
with val/val_annotations.txt. The official test split has no labels, so val/ is
the test split here and the validation split is carved from train (10,000
images). Presets: (none) joint, mate, byot. ResNet-18 at 64x64 keeps the CIFAR
stem, so its feature maps are 4x larger than on CIFAR (about 2.2 G MACs).
Result: not measured yet.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/, from any folder
from configs import cifar10  # pylint: disable=wrong-import-position


def get_config(arg: str | None = None):
  if arg not in (None, "", "mate", "byot"):
    raise ValueError(f"unknown preset {arg!r} for configs/tiny_imagenet.py; valid: mate, byot")
  config = cifar10.get_config(arg or None)
  config.data.source = "tiny_imagenet"  # tiny-imagenet-200.zip; val/ is the test split
  config.data.test_split = "val"
  config.data.val_size = 10000
  config.data.crop_pad = 8
  config.train.epochs = 100
  return config
