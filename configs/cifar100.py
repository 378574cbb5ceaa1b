r"""CIFAR-100, jointly trained multi-exit ResNets (the 100 fine labels of cifar-100-python.tar.gz).

Presets:

  (none)  ResNet-18, 4 exits, 200 epochs: the GPU recipe.
            python -m eejax.main --config configs/cifar100.py --workdir /tmp/c100
          Result: not measured yet (CIFAR-100 is not on the development machines).
  erde_teacher, erde, erde_kd, erde_student: the ERDE presets of configs/cifar10.py.
            python launch/erde.py --config configs/cifar100.py --scale gpu
  mate, byot (and mate_cpu, byot_cpu, joint_cpu): self-distillation, as in configs/cifar10.py.
            python launch/self_distillation.py --config configs/cifar100.py --scale gpu
  sdn_cnn, ic_only, sdn, sdn_joint (and their _cpu variants): SDN's, as in configs/cifar10.py.
            python launch/sdn.py --config configs/cifar100.py --scale gpu
  cpu     ResNet-8, 3 exits, 8 epochs, as configs/cifar10.py:cpu.
            python -m eejax.main --config configs/cifar100.py:cpu --workdir /tmp/c100cpu
          Result: not measured yet.

The archive is downloaded on first use (eejax.datasets); offline, give a copy with
--config.data.source=cifar100:/path/to/cifar-100-python.tar.gz.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/, from any folder
from configs import cifar10  # pylint: disable=wrong-import-position


def get_config(arg: str | None = None):
  if arg not in (None, "", "cpu", *cifar10.PRESETS):
    raise ValueError(f"unknown preset {arg!r} for configs/cifar100.py; valid: cpu, {', '.join(cifar10.PRESETS)}")
  config = cifar10.get_config(arg or None)
  config.data.source = "cifar100"
  return config
