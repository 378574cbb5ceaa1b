"""python -m eejax.main --config configs/cifar10.py[:preset] --workdir DIR [--config.x=y ...]

Mistakes a user can fix (an unknown config key, model or head name, a missing
dataset, an unreadable checkpoint) end with one line on stderr and status 2.
A run stopped by SIGTERM or Ctrl-C saves a checkpoint and exits 128+signal;
the same command resumes it.

A multi-process job (several hosts, or one process per GPU): the same command
on every process, with --config.distributed=True where JAX finds the job in
the environment (SLURM, Open MPI, TPU pods), or with --coordinator,
--num_processes and --process_id (see `eejax.distributed`).
"""
from absl import app, flags, logging
from ml_collections import config_flags

from eejax.cli import config_value, fail, guarded, parse_flags
from eejax.signals import interrupt_after

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py:cpu.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the report.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "Multi-process job: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process job: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process job: this process, 0 to num_processes-1.")
_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Multi-process job: seconds to wait for every "
                                "process to join before giving up with one line.")
_PEER_TIMEOUT = flags.DEFINE_integer("peer_timeout", 60, "Multi-process job: a process silent this many seconds "
                                     "(killed, hung, its host lost) ends the job with one line.")


def main(argv):
  del argv
  config = config_value(_CONFIG)
  if config is None or not _WORKDIR.value:
    fail("give --config=configs/FILE.py[:preset] and --workdir=DIR")
  guarded(lambda: _job(config), "eejax", _WORKDIR.value)


def _job(config):
  with interrupt_after():
    from eejax import api, distributed, validate  # pylint: disable=g-import-not-at-top  # after flags: a fast --help
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cluster = distributed.Cluster(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                from_environment=config.distributed, timeout_s=_TIMEOUT.value,
                                peer_timeout_s=_PEER_TIMEOUT.value)
  validate.check_config(config)
  distributed.initialize(cluster)
  api.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
