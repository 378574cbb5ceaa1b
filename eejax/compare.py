r"""Finished runs side by side, pooled over seeds: mean ± standard deviation of each group's test figures.

  python -m eejax.compare joint=R/joint/seed* mate=R/mate/seed* [--out DIR] [--policy max_prob]

Each argument is LABEL=GLOB, or a GLOB that labels itself: the finished runs
(workdirs holding report.json) pooled into one group. Per group: how many
runs and their seeds; each exit's test accuracy; the policy's best test
accuracy within each MACs budget (the test curve); and the per-exit
thresholds fitted on validation for each budget, with their test accuracy and
share of the full network's MACs. Each is the mean ± the sample standard
deviation over the group's runs. Every group after the first is compared with
the first on the final exit: the difference of the means with its 95%
confidence interval (Welch's t), so a gain within the seeds' spread reads as
such. Writes DIR/compare.md, compare.json and compare.png (the fitted
settings' test accuracy against MACs, with error bars, and each exit), where
the runs validated during training compare_training.png (the final exit's
validation accuracy against epochs, mean ± std per group), and prints the
table. Nothing is trained or evaluated again.
"""
import glob
import json
import math
import os

from absl import app, flags

from eejax import cli

if __name__ == "__main__":  # Ctrl-C while the imports below load: one line, not a traceback
  cli.exit_on_interrupt("eejax.compare")

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from scipy import stats  # comes with jax

from eejax import history, latex, workdirs
from eejax.errors import UserError
# pylint: enable=g-import-not-at-top,wrong-import-position


def expand(argument: str) -> tuple[str, list[str]]:
  """(label, sorted workdirs) of LABEL=GLOB or GLOB; a UserError when no folder matches."""
  label, sep, pattern = argument.partition("=")
  if not sep or os.sep in label:
    label, pattern = argument, argument
  if not label:
    raise UserError(f"{argument!r} gives its group no label: give LABEL=GLOB, e.g. joint='R/joint/seed*'")
  found = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isdir(p))
  if not found:
    raise UserError(f"{pattern!r} matches no folder: give LABEL=GLOB of finished runs, e.g. joint='R/joint/seed*'")
  return label, found


def load(workdir: str) -> dict:
  """The run's report.json, with its config.json as "config" and its seed (None when absent)."""
  path = os.path.join(workdir, "report.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir} has no report.json: not a finished run (run it to the end, or leave it out)")
  try:
    with open(path, encoding="utf-8") as f:
      report = json.load(f)
    config = None
    if os.path.exists(os.path.join(workdir, "config.json")):
      with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{workdir}: a damaged report.json or config.json ({e}); run its command again to write "
                    "them anew") from None
  if not isinstance(report, dict) or not report.get("exits"):
    raise UserError(f"{path} is not an eejax run report (no per-exit accuracies)")
  if config is not None and not isinstance(config, dict):
    raise UserError(f"{workdir}/config.json is not an eejax config (not a JSON object); run its command again to "
                    f"write it anew")
  return {**report, "config": config, "seed": None if config is None else config.get("seed"), "workdir": workdir}


def check_pooled(label: str, runs: list[dict]) -> None:
  """A group is one run over seeds: its runs' settings that bear on what they train and report must agree (how
  each job ran aside, `workdirs.RUNS_ANY_WAY`), and no seed may come twice: the same seed trains the same run, and
  pooling it twice would narrow the spread."""
  first, *others = [r for r in runs if r["config"] is not None] or [None]
  for r in others:
    what = workdirs.differences(first["config"], r["config"],
                                lambda key: key != "seed" and workdirs.shapes_result(key, r["config"].get("scheme")),
                                words=(f"in {first['workdir']}", f"in {r['workdir']}"))
    if what:
      raise UserError(f"group {label!r} pools runs that differ in more than their seed ({what}); give each its "
                      f"own group")
  by_seed = {}
  for r in runs:
    if r["seed"] is not None and r["seed"] in by_seed:
      raise UserError(f"group {label!r} holds seed {r['seed']} twice ({by_seed[r['seed']]} and {r['workdir']}): the "
                      f"same seed trains the same run, and pooling it twice would narrow the spread; leave one out")
    by_seed[r["seed"]] = r["workdir"]


def figures(report: dict, policy: str) -> dict:
  """{column: value or None}: each exit's accuracy, the best within each budget, each fitted budget's accuracy and
  MACs share (the per-exit thresholds fitted on validation, reported on test)."""
  out = {"final exit": report["exits"][-1]["accuracy"]}
  out.update({f"exit {e['exit']}": e["accuracy"] for e in report["exits"]})
  for budget, accuracy in report.get("policies", {}).get(policy, {}).get("budgets", {}).items():
    out[f"best @{100 * float(budget):g}%"] = accuracy
  for row in report.get("fitted_on_val", {}).get(policy, []):
    fit = row["per_exit"]
    fits = fit.get("fits_budget_on_val", True)  # no setting within the budget (below exit 1's cost): left blank
    out[f"fitted {100 * row['budget']:g}%"] = fit["test_accuracy"] if fits else None
    out[f"fitted {100 * row['budget']:g}% MACs"] = fit["test_macs_fraction"] if fits else None
  return out


def summary(values) -> dict:
  """mean, sample std (None for one value) and n of the values that are not None."""
  x = np.array([v for v in values if v is not None], np.float64)
  return {"mean": float(x.mean()) if x.size else None, "std": float(x.std(ddof=1)) if x.size > 1 else None,
          "n": int(x.size)}


def welch(a, b) -> dict | None:
  """mean(a) - mean(b) with its 95% interval (Welch's t); None unless both have two values or more."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.size < 2 or b.size < 2:
    return None
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  se = math.sqrt(va + vb)
  df = (va + vb)**2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)) if se > 0 else a.size + b.size - 2
  half = float(stats.t.ppf(0.975, df)) * se
  diff = float(a.mean() - b.mean())
  return {"difference": diff, "low": diff - half, "high": diff + half}


def compare(groups: list[tuple[str, list[str]]], policy: str = "max_prob") -> dict:
  """Every group's runs, their figures and the summaries; see the module docstring."""
  labels = [label for label, _ in groups]
  twice = sorted({label for label in labels if labels.count(label) > 1})
  if twice:  # two rows and two curves of one name, that no reader could tell apart
    raise UserError(f"group {twice[0]!r} is given twice: give each group once, its glob matching all its runs "
                    f"({twice[0]}='R/{twice[0]}/seed*'), or give the two their own labels")
  out = []
  for label, found in groups:
    runs = [load(w) for w in found]
    kinds = {(r["model"], r.get("dataset"), len(r["exits"])) for r in runs}
    if len(kinds) > 1:
      raise UserError(f"group {label!r} pools runs of different models or data: {sorted(kinds, key=str)}; "
                      "give each its own group")
    check_pooled(label, runs)
    lacking = [r for r in runs if policy not in r.get("policies", {})]
    if lacking:
      raise UserError(f"{lacking[0]['workdir']}'s report has no policy {policy!r}: give --policy one of "
                      f"{', '.join(lacking[0].get('policies', {})) or '(none)'}")
    rows = [figures(r, policy) for r in runs]
    columns = list(dict.fromkeys(c for row in rows for c in row))
    first = runs[0]
    out.append({"label": label, "model": first["model"], "dataset": first.get("dataset"),
                "exit_macs_share": [e["macs"] / first["full_macs"] for e in first["exits"]]
                                   if first.get("full_macs") else None,
                "runs": [{"workdir": r["workdir"], "seed": r["seed"], **row} for r, row in zip(runs, rows)],
                "summary": {c: summary(row.get(c) for row in rows) for c in columns},
                "final": [row["final exit"] for row in rows]})
    out[-1]["val_curve"] = val_curve(found, len(first["exits"]))
  for group in out[1:]:
    group["final_vs_first"] = welch(group["final"], out[0]["final"])
  return {"policy": policy, "groups": out}


def val_curve(workdirs_found, num_exits: int) -> dict | None:
  """The final exit's validation accuracy during training (`eejax.history`), mean and sample std over the runs at
  every step all of them validated; None unless every run validated during training."""
  curves = []
  for workdir in workdirs_found:
    records = history.read(workdir)
    steps_K, acc_K = history.series(records, f"val/accuracy_exit{num_exits}")
    if not len(steps_K):
      return None
    epoch_of = history.epochs(records)
    curves.append({int(s): (epoch_of[int(s)], float(a)) for s, a in zip(steps_K, acc_K)})
  common = sorted(set.intersection(*(set(c) for c in curves)))
  if not common:
    return None
  acc_RxK = np.array([[c[s][1] for s in common] for c in curves])
  return {"epochs": [curves[0][s][0] for s in common], "mean": acc_RxK.mean(0).tolist(),
          "std": acc_RxK.std(0, ddof=1).tolist() if len(curves) > 1 else None, "runs": len(curves)}


def _cell(s: dict, scale: float = 100.0) -> str:
  if s is None or s["mean"] is None:
    return ""
  return f"{scale * s['mean']:.2f}" + ("" if s["std"] is None else f" ± {scale * s['std']:.2f}")


def markdown(result: dict, command: str = "") -> str:
  groups = result["groups"]
  columns = list(dict.fromkeys(c for g in groups for c in g["summary"]))
  lines = ["# Runs compared over seeds", ""] + ([f"Command: `{command}`", ""] if command else []) + [
      f"Test accuracy (%) as mean ± sample standard deviation over each group's runs; policy `{result['policy']}`: "
      "'best @B' is the best test accuracy within B of the full network's MACs (test curve), 'fitted B' the per-exit "
      "thresholds fitted on validation for B, on test, and 'fitted B MACs' their share of the MACs (%).", "",
      "| group | model | runs (seeds) | " + " | ".join(columns) + " |", "|---|---|---|" + "---:|" * len(columns)]
  for g in groups:
    seeds = ", ".join("?" if r["seed"] is None else str(r["seed"]) for r in g["runs"])
    lines.append(f"| {g['label']} | {g['model']} | {len(g['runs'])} ({seeds}) | "
                 + " | ".join(_cell(g["summary"].get(c)) for c in columns) + " |")
  rest = [g for g in groups[1:] if g.get("final_vs_first")]
  if rest:
    lines += ["", f"Final exit against `{groups[0]['label']}` (difference of means, 95% interval, Welch's t):", ""]
    for g in rest:
      w = g["final_vs_first"]
      verdict = "within the seeds' spread" if w["low"] <= 0 <= w["high"] else ("better" if w["low"] > 0 else "worse")
      lines.append(f"- {g['label']}: {100 * w['difference']:+.2f} points [{100 * w['low']:+.2f}, "
                   f"{100 * w['high']:+.2f}]: {verdict}")
  if any(g.get("val_curve") for g in groups):
    lines += ["", "`compare_training.png`: the final exit's validation accuracy during training, mean ± standard "
              "deviation over each group's runs."]
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
  """Test accuracy against MACs share: each group's fitted settings (error bars: std over runs) and its exits."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from eejax import report  # pylint: disable=g-import-not-at-top  # matplotlib only where a figure is drawn
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for g in result["groups"]:
    s = g["summary"]
    fitted = [c for c in s if c.startswith("fitted ") and not c.endswith("MACs")
              and s[c]["mean"] is not None and s.get(c + " MACs", {}).get("mean") is not None]
    if fitted:
      x = [100 * s[c + " MACs"]["mean"] for c in fitted]
      y = [100 * s[c]["mean"] for c in fitted]
      xerr = [100 * (s[c + " MACs"]["std"] or 0) for c in fitted]
      yerr = [100 * (s[c]["std"] or 0) for c in fitted]
      line = ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=f"{g['label']} (fitted)")
    if g["exit_macs_share"]:
      exits = [c for c in s if c.startswith("exit ")]  # in order: "exit 1", "exit 2", ...
      ax.errorbar([100 * m for m in g["exit_macs_share"]], [100 * s[c]["mean"] for c in exits],
                  yerr=[100 * (s[c]["std"] or 0) for c in exits], fmt="x", capsize=3,
                  color=line[0].get_color() if fitted else None, label=f"{g['label']} (each exit)")
  ax.set_xlabel("mean MACs per image (% of the full network)")
  ax.set_ylabel("test accuracy (%)")
  ax.grid(alpha=0.3)
  if ax.has_data():
    ax.legend(fontsize=8, loc="lower right")
  report.save_figure(fig, path)


def plot_training(result: dict, path: str) -> bool:
  """The final exit's validation accuracy against epochs, one line per group (a band: ± the std over its runs);
  False, drawing nothing, when no group validated during training."""
  groups = [g for g in result["groups"] if g.get("val_curve")]
  if not groups:
    return False
  from eejax import report  # pylint: disable=g-import-not-at-top  # matplotlib only where a figure is drawn
  fig, ax = report.plt.subplots(figsize=(6, 4), dpi=120)
  for g in groups:
    curve = g["val_curve"]
    epochs, mean = np.array(curve["epochs"]), 100 * np.array(curve["mean"])
    line, = ax.plot(epochs, mean, ".-", ms=3, lw=1.2, label=f"{g['label']} ({curve['runs']} runs)")
    if curve["std"] is not None:
      std = 100 * np.array(curve["std"])
      ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
  ax.set_xlabel("epoch")
  ax.set_ylabel("final exit, validation accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  report.save_figure(fig, path)
  return True


def write(result: dict, out_dir: str, command: str = "") -> str:
  """compare.md (its tables also as compare.tex), compare.json, compare.png and, where the runs validated during
  training, compare_training.png in out_dir; returns the markdown."""
  os.makedirs(out_dir, exist_ok=True)
  text = markdown(result, command)
  latex.write_markdown(os.path.join(out_dir, "compare.md"), text)
  workdirs.write_json(os.path.join(out_dir, "compare.json"), {"command": command, **result})
  plot(result, os.path.join(out_dir, "compare.png"))
  plot_training(result, os.path.join(out_dir, "compare_training.png"))
  return text


def main(argv) -> None:
  f = flags.FLAGS
  if len(argv) < 2:
    cli.fail("give one or more LABEL=GLOB of finished runs, e.g. joint='R/joint/seed*' mate='R/mate/seed*'",
             "eejax.compare")
  command = "python -m eejax.compare " + " ".join(argv[1:])
  def job():
    workdirs.check_path(f.out, "comparison", "--out")  # before any report is read
    return write(compare([expand(a) for a in argv[1:]], f.policy), f.out, command)
  text = cli.guarded(job, "eejax.compare", f.out)
  print(text)


if __name__ == "__main__":
  flags.DEFINE_string("out", ".", "Folder for compare.md, compare.json and compare.png.")
  flags.DEFINE_string("policy", "max_prob", "The exit policy whose budgets and fitted thresholds are compared.")
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, "eejax.compare"))
