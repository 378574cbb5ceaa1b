r"""SVHN (cropped digits), jointly trained multi-exit ResNets (tfds:svhn_cropped).

Digits are not mirror-symmetric, so the horizontal flip is off.

Presets:

  (none)  ResNet-18, 4 exits, 40 epochs: the GPU recipe.
            python -m eejax.main --config configs/svhn.py --workdir /tmp/svhn
          Result: not measured yet (SVHN is not on the development machines).
  cpu     ResNet-8, 3 exits, 4 epochs.
            python -m eejax.main --config configs/svhn.py:cpu --workdir /tmp/svhncpu
          Result: not measured yet.

tfds:svhn_cropped must be prepared in tfds's data_dir, or downloaded on first use
with --config.data.download=True (network access and `pip install 'eejax[tfds]'`).
"""
from configs import cifar10


def get_config(arg: str | None = None):
  if arg not in (None, "", "cpu"):
    raise ValueError(f"unknown preset {arg!r} for configs/svhn.py; valid: cpu")
  config = cifar10.get_config(arg or None)
  config.data.source = "tfds:svhn_cropped"
  config.data.flip = False
  config.train.epochs = 4 if arg == "cpu" else 40
  config.train.learning_rate = 0.05 if arg != "cpu" else 0.1
  return config
