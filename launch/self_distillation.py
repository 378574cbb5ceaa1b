"""Joint vs BYOT vs MATE with the same backbone, budget and seed, in one comparison table.

  python launch/self_distillation.py --scale cpu --data folder:../shared/data/cifar10
  python launch/self_distillation.py --scale gpu --config configs/cifar100.py

Runs (each `python -m eejax.main` in ROOT/<scheme>, resumed if interrupted,
skipped if finished), then ROOT/comparison.md and .json: per-exit test
accuracy, the max-probability policy's accuracy at MACs budgets (test curve),
per-exit thresholds fitted on validation for 50% of the MACs (test accuracy),
and MATE's learned teacher weights. Scale 'cpu': the cpu presets (ResNet-8) on
a data subset for a few epochs; 'gpu': ResNet-18, 200 epochs. With `--seeds N`
each scheme also runs with seeds 1 to N-1 and ROOT/compare.md pools them
(mean ± std, and each scheme's final exit against joint's with a 95% interval).
"""
import os

import runs

SCALES = {
    "cpu": {"presets": {"joint": "joint_cpu", "byot": "byot_cpu", "mate": "mate_cpu"},
            "extra": ["--config.data.max_images=12000", "--config.data.val_size=2000", "--config.train.epochs=4",
                      "--config.eval.real_inference=False"]},
    "gpu": {"presets": {"joint": "", "byot": "byot", "mate": "mate"}, "extra": []},
}


def row(name, report):
  return {"scheme": name, **runs.report_row(report), "teacher_weights": report.get("ensemble_weights")}


def markdown(rows, command):
  num_exits = len(rows[0]["exit_accuracy"])
  lines = ["# Multi-exit self-distillation: joint vs BYOT vs MATE", "", f"Command: `{command}`", "",
           "Test accuracy (%); same backbone, training budget and seed. Max-probability policy: best test accuracy "
           "within each MACs budget (test curve), and per-exit thresholds fitted on validation for 50% of the MACs, "
           "reported on test.", "", *runs.exit_table(rows, "scheme", "scheme")]
  for r in rows:
    if r["teacher_weights"]:
      lines += ["", "MATE's learned teacher weights (row j: teacher j's weight on each exit, softmax(a_j)):", "",
                "| teacher | " + " | ".join(f"exit {e + 1}" for e in range(num_exits)) + " |",
                "|---|" + "---:|" * num_exits]
      lines += [f"| {j + 1} | " + " | ".join(f"{w:.3f}" for w in ws) + " |" for j, ws in enumerate(r["teacher_weights"])]
  return "\n".join(lines) + "\n"


def main():
  args = runs.parse_args(SCALES, "self_distillation")
  scale = SCALES[args.scale]
  rows, groups = [], []
  for name, preset in scale["presets"].items():
    config = f"{args.config}:{preset}" if preset else args.config
    done = runs.run_seeds(name, config, os.path.join(args.root, name), args.data, scale["extra"] + args.extra,
                          args.seeds)
    rows.append(row(name, done[0][1]))
    groups.append((name, [workdir for workdir, _ in done]))
  command = runs.command_line("self_distillation.py", args)
  runs.write_tables(args.root, command, rows, markdown(rows, command))
  runs.write_seed_table(args.root, command, groups)


if __name__ == "__main__":
  main()
