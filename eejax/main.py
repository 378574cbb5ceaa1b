"""python -m eejax.main --config configs/cifar10.py[:preset] --workdir DIR [--config.x=y ...]

Mistakes a user can fix (an unknown config key, model or head name, a missing
dataset, an unreadable checkpoint) end with one line on stderr and status 2.
A run stopped by SIGTERM or Ctrl-C saves a checkpoint and exits 128+signal;
the same command resumes it.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from eejax.cli import fail, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py:cpu.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the report.")


def main(argv):
  del argv
  from eejax import api, checkpoint  # pylint: disable=g-import-not-at-top  # after flags: fast --help
  from eejax.errors import UserError  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _CONFIG.value is None or not _WORKDIR.value:
    fail("give --config=configs/FILE.py[:preset] and --workdir=DIR")
  try:
    api.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    fail(str(e))
  except checkpoint.Stopped as e:
    print(f"eejax: {e}", file=sys.stderr)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
