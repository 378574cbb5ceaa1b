r"""CINIC-10 (Darlow et al. 2018): 270,000 32x32 images in CIFAR-10's classes, ImageNet and CIFAR.

CINIC-10.tar.gz unpacks to a class-per-folder tree `train/ valid/ test/<class>/*.png` (90,000 each);
eejax downloads and unpacks it on first use (eejax.datasets) and reads `valid/` as the validation
split. Offline: --config.data.source=cinic10:/path/to/CINIC-10.tar.gz, or folder:PATH to an unpacked copy.

Presets (the paper's BTS-EE setting is ResNet-18 on CINIC-10):

  (none)   ResNet-18, 4 exits, 100 epochs: the backbone, GPU recipe.
             python -m eejax.main --config configs/cinic10.py --workdir /tmp/cinic_r18
  bts      BTS-EE branches on that backbone, boosted and non-boosted at every CPM margin.
             python -m eejax.main --config configs/cinic10.py:bts --workdir /tmp/cinic_bts \
               --config.bts.backbone=/tmp/cinic_r18
           python launch/bts_grid.py --config configs/cinic10.py --backbone /tmp/cinic_r18 runs the grid.
  cpu, bts_cpu, smoke and the other presets of configs/cifar10.py also apply.
Result: not measured (CINIC-10 is not on the development machines).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/, from any folder
from configs import cifar10  # pylint: disable=wrong-import-position


def get_config(arg: str | None = None):
  if arg not in (None, "", "cpu", "smoke", *cifar10.PRESETS):
    raise ValueError(f"unknown preset {arg!r} for configs/cinic10.py; valid: cpu, smoke, {', '.join(cifar10.PRESETS)}")
  config = cifar10.get_config(arg or None)
  config.data.source = "cinic10"  # train/, valid/ (validation), test/ of CINIC-10.tar.gz
  if not arg:
    config.train.epochs = 100
  return config
