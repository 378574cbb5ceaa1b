"""SDN (Kaya et al. 2019): the network alone, IC-only, SDN training and plain joint training, in one table.

  python launch/sdn.py --scale cpu --data folder:../shared/data/cifar10
  python launch/sdn.py --scale gpu --data folder:../shared/data/cifar10   # SDN's ResNet-56 and recipe

Runs (each `python -m eejax.main` in ROOT/<name>, resumed if interrupted, skipped if finished):
  cnn      the network alone (one exit), SDN's recipe (configs/cifar10.py:sdn_cnn);
  ic_only  SDN's internal classifiers trained on ROOT/cnn, frozen (:ic_only);
  sdn      SDN training from scratch, the classifiers' weights growing every epoch (:sdn);
  joint    the same network and classifiers, every exit weighing 1 (:sdn_joint).
Then ROOT/comparison.md and .json: per-exit test accuracy, the max-probability policy's accuracy at MACs
budgets (test curve), and per-exit thresholds fitted on validation for 50% of the MACs (test accuracy).
Scale 'cpu': ResNet-8, exits after blocks 1, 2, 3, on a data subset; 'gpu': ResNet-56 with SDN's six.
With `--seeds N` every variant also runs with seeds 1 to N-1 (IC-only on the network alone of its seed), and
ROOT/compare.md pools them (mean ± std, eejax.compare).
"""
import os

import runs

SCALES = {
    "cpu": {"suffix": "_cpu", "extra": ["--config.data.max_images=12000", "--config.data.val_size=2000",
                                        "--config.train.epochs=10", "--config.eval.real_inference=False"],
            "ic_only_extra": ["--config.train.epochs=4"]},
    "gpu": {"suffix": "", "extra": [], "ic_only_extra": []},
}
NAMES = {"cnn": "sdn_cnn", "ic_only": "ic_only", "sdn": "sdn", "joint": "sdn_joint"}


def markdown(rows, command):
  return "\n".join(["# SDN: the network alone, IC-only, SDN training and joint training", "",
                    f"Command: `{command}`", "",
                    "Test accuracy (%); the same backbone, data and seed. Max-probability policy: best test accuracy "
                    "within each MACs budget (test curve), and per-exit thresholds fitted on validation for 50% of "
                    "the MACs, reported on test. The network alone has one exit, so its policy has nothing to choose.",
                    "", *runs.exit_table(rows, "training", "name")]) + "\n"


def main():
  args = runs.parse_args(SCALES, "sdn")
  scale = SCALES[args.scale]
  groups = {name: [] for name in NAMES}  # name -> [(workdir, report)], seed 0 first
  for seed in range(args.seeds):
    tail, seeded = ("", []) if seed == 0 else (f"_seed{seed}", [f"--config.seed={seed}"])
    for name, preset in NAMES.items():
      extra = scale["extra"] + seeded
      if name == "ic_only":  # on the network alone of the same seed
        extra += scale["ic_only_extra"] + [f"--config.ic_only.backbone={groups['cnn'][seed][0]}"]
      workdir = os.path.join(args.root, name + tail)
      groups[name].append((workdir, runs.run(name, f"{args.config}:{preset}{scale['suffix']}", workdir, args.data,
                                             extra + args.extra)))
  rows = [{"name": name, **runs.report_row(done[0][1])} for name, done in groups.items()]
  command = runs.command_line("sdn.py", args)
  runs.write_tables(args.root, command, rows, markdown(rows, command))
  runs.write_seed_table(args.root, command, [(name, [w for w, _ in done]) for name, done in groups.items()])


if __name__ == "__main__":
  main()
