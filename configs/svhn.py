r"""SVHN (cropped digits: train_32x32.mat, test_32x32.mat), jointly trained multi-exit ResNets.

Digits are not mirror-symmetric, so the horizontal flip is off.

Presets:

  (none)  ResNet-18, 4 exits, 40 epochs: the GPU recipe.
            python -m eejax.main --config configs/svhn.py --workdir /tmp/svhn
          Result: not measured yet (SVHN is not on the development machines).
  erde_teacher, erde, erde_kd, erde_student: the ERDE presets of configs/cifar10.py.
            python launch/erde.py --config configs/svhn.py --scale gpu
  mate, byot (and mate_cpu, byot_cpu, joint_cpu): self-distillation, as in configs/cifar10.py.
            python launch/self_distillation.py --config configs/svhn.py --scale gpu
  sdn_cnn, ic_only, sdn, sdn_joint (and their _cpu variants): SDN's, as in configs/cifar10.py, with SDN's
            recipe (not this file's 40 epochs). python launch/sdn.py --config configs/svhn.py --scale gpu
  cpu     ResNet-8, 3 exits, 4 epochs.
            python -m eejax.main --config configs/svhn.py:cpu --workdir /tmp/svhncpu
          Result: not measured yet.

Both files are downloaded on first use (eejax.datasets; label 10 is the digit 0); offline, give a
folder holding them with --config.data.source=svhn:/path/to/folder.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/, from any folder
from configs import cifar10  # pylint: disable=wrong-import-position


def get_config(arg: str | None = None):
  if arg not in (None, "", "cpu", *cifar10.PRESETS):
    raise ValueError(f"unknown preset {arg!r} for configs/svhn.py; valid: cpu, {', '.join(cifar10.PRESETS)}")
  config = cifar10.get_config(arg or None)
  config.data.source = "svhn"
  config.data.flip = False
  if arg in cifar10.SDN_PRESETS:  # SDN's recipe as it is (its step schedule, IC-only's Adam)
    return config
  cpu = bool(arg) and arg.endswith("cpu")
  config.train.epochs = 4 if cpu else 40
  config.train.learning_rate = 0.1 if cpu else 0.05
  return config
