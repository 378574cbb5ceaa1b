"""ERDE: train the teacher, then the student three ways, and write one comparison table.

  python launch/erde.py --scale cpu --data folder:../shared/data/cifar10 --root workdirs/erde_cpu
  python launch/erde.py --scale gpu --config configs/cifar10.py --root workdirs/erde

Runs (each an ordinary `python -m eejax.main` job in ROOT/<name>, resumed if
interrupted, skipped if it finished with these settings, see launch/runs.py):
  teacher  preset erde_teacher (joint)
  student  preset erde_student: the student alone (joint)
  kd       preset erde_kd: KD from the teacher, no entropy term
  erde     preset erde: KD plus the entropy term on the teacher's mistakes
then ROOT/comparison.md and ROOT/comparison.json (seed 0): per-exit test accuracy, the
entropy policy's accuracy at MACs budgets (test curve), and the entropy
thresholds fitted on validation for 50% of the MACs with their test accuracy
and mean MACs. Scale 'cpu' is a small setting for a 2-core machine (ResNet-20
teacher, ResNet-20 at half width as the student, a data subset, a few epochs);
'gpu' is the presets as they are (ResNet-34 -> ResNet-18, 200 epochs). With
`--seeds N` the three students also run with seeds 1 to N-1 (one teacher) and
ROOT/compare.md pools them: mean ± std, and KD's and ERDE's final exit against
the student alone's with a 95% interval.
"""
import os

import runs

SCALES = {
    "cpu": {"common": ["--config.data.max_images=12000", "--config.data.val_size=2000", "--config.train.epochs=3",
                       "--config.train.steps_per_call=2", "--config.eval.real_inference=False",
                       "--config.checkpoint.every_steps=200"],
            "teacher": ["--config.model.name=resnet20"],
            "student": ["--config.model.name=resnet20", "--config.model.width=0.5"]},
    "gpu": {"common": [], "teacher": [], "student": []},
}
RUNS = (("teacher", "erde_teacher"), ("student", "erde_student"), ("kd", "erde_kd"), ("erde", "erde"))


def row(name, report):
  entropy = report["policies"]["entropy"]
  fitted = {r["budget"]: r["per_exit"] for r in report["fitted_on_val"]["entropy"]}
  at_half = fitted.get(0.5)
  return {"variant": name, "model": report["model"], "full_macs": report["full_macs"],
          "exit_accuracy": [e["accuracy"] for e in report["exits"]],
          "entropy_budget_accuracy": entropy["budgets"],
          "entropy_fitted_50": None if at_half is None else {
              "test_accuracy": at_half["test_accuracy"], "mean_macs": at_half["test_macs_fraction"] * report["full_macs"],
              "macs_fraction": at_half["test_macs_fraction"], "thresholds": [row[0] for row in at_half["threshold_ExC"][:-1]]}}


def markdown(rows, command):
  pct = runs.pct
  budgets = list(rows[0]["entropy_budget_accuracy"])
  num_exits = max(len(r["exit_accuracy"]) for r in rows)
  lines = ["# ERDE comparison", "", f"Command: `{command}`", "",
           "Test accuracy (%). Entropy policy: best test accuracy within each MACs budget (test curve), and the "
           "per-exit entropy thresholds fitted on validation for 50% of the MACs, reported on test. MACs are "
           "multiply-accumulates per image.", "",
           "| variant | model | " + " | ".join(f"exit {e + 1}" for e in range(num_exits)) + " | "
           + " | ".join(f"entropy @{100 * float(b):.0f}%" for b in budgets)
           + " | fitted 50%: accuracy | fitted 50%: mean MACs (M) |",
           "|---|---|" + "---:|" * (num_exits + len(budgets) + 2)]
  for r in rows:
    exits = [pct(a) for a in r["exit_accuracy"]] + [""] * (num_exits - len(r["exit_accuracy"]))
    fitted = r["entropy_fitted_50"] or {}
    lines.append(f"| {r['variant']} | {r['model']} | " + " | ".join(exits) + " | "
                 + " | ".join(pct(r["entropy_budget_accuracy"][b]) for b in budgets)
                 + f" | {pct(fitted.get('test_accuracy'))} | "
                 + (f"{fitted['mean_macs'] / 1e6:.2f}" if fitted else "n/a") + " |")
  return "\n".join(lines) + "\n"


def main():
  args = runs.parse_args(SCALES, "erde")
  scale = SCALES[args.scale]
  teacher = os.path.join(args.root, "teacher")
  rows, groups = [], []
  for name, preset in RUNS:
    extra = scale["common"] + (scale["teacher"] if name == "teacher" else scale["student"]) + args.extra
    if preset in ("erde", "erde_kd"):
      extra = extra + [f"--config.erde.teacher={teacher}"]
    seeds = 1 if name == "teacher" else args.seeds  # every student learns from the one teacher
    done = runs.run_seeds(name, f"{args.config}:{preset}", os.path.join(args.root, name), args.data, extra, seeds)
    rows.append(row(name, done[0][1]))
    if name != "teacher":
      groups.append((name, [workdir for workdir, _ in done]))
  command = runs.command_line("erde.py", args)
  runs.write_tables(args.root, command, rows, markdown(rows, command))
  runs.write_seed_table(args.root, command, groups)


if __name__ == "__main__":
  main()
