"""report.json, report.md (with report.tex) and curve.png (with curve.pdf) from a report dict (see `eejax.evaluate`)."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from eejax import latex, workdirs  # pylint: disable=g-import-not-at-top,wrong-import-position


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.2f}"


def markdown(report: dict) -> str:
  full = report["full_macs"]
  lines = [f"# {report['method']}: {report['model']} on {report['dataset']}", "",
           f"Test split, {report['splits']['test']} images. MACs are multiply-accumulates per image "
           f"(FLOPs = 2 x MACs); full network: {full / 1e6:.2f} M MACs.", "", *_untrained_lines(report),
           "| exit | accuracy (%) | MACs (M) | % of full |", "|---:|---:|---:|---:|"]
  for e in report["exits"]:
    lines.append(f"| {e['exit']} | {_pct(e['accuracy'])} | {e['macs'] / 1e6:.2f} | {100 * e['macs'] / full:.1f} |")
  for name, policy in report["policies"].items():
    lines += ["", f"## Policy `{name}`: accuracy (%) at a MACs budget", "",
              "Best test accuracy among thresholds whose mean cost is within the budget.", "",
              "| budget (% of full MACs) | accuracy (%) |", "|---:|---:|"]
    for budget, acc in policy["budgets"].items():
      lines.append(f"| {100 * float(budget):.0f} | {_pct(acc)} |")
  lines += (_fitted_lines(report) + certified_lines(report) + _calibration_lines(report) + _real_inference_lines(report)
            + history_lines(report))
  if report.get("train_images_per_s"):
    lines += ["", f"Training throughput: {report['train_images_per_s']:,.0f} images/s "
              f"(steady state, compilation excluded), {report.get('train_steps')} steps."]
  return "\n".join(lines) + "\n"


def _untrained_lines(report: dict) -> list[str]:
  if report.get("train_steps") != 0:
    return []
  return [f"Not trained here (train.epochs=0): the weights of `{report.get('init_from')}` as they are.", ""]


def _threshold(t) -> str:
  return "never" if t is None else f"{t:.4f}"


def _fitted_lines(report: dict) -> list[str]:
  lines = []
  for policy, rows in report.get("fitted_on_val", {}).items():
    lines += ["", f"## Policy `{policy}`: thresholds fitted on validation for a budget, reported on test", "",
              "Fitted on the validation split (never on test); accuracy and cost below are on test. "
              "A budget marked * is below the cost of exit 1: the cheapest setting is shown.", "",
              "| budget | per-exit thresholds | test accuracy (%) | test MACs (% of full) "
              "| global threshold | test accuracy (%) | test MACs (% of full) |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
      p, g = row["per_exit"], row["global"]
      mark = "" if p["fits_budget_on_val"] else "*"
      per_exit = ", ".join(_threshold(row_C[0]) for row_C in p["threshold_ExC"][:-1]) or "none (one exit)"
      global_t = _threshold(g["threshold_ExC"][0][0]) if len(g["threshold_ExC"]) > 1 else "none"
      lines.append(f"| {100 * row['budget']:.0f}%{mark} | {per_exit} "
                   f"| {_pct(p['test_accuracy'])} | {100 * p['test_macs_fraction']:.1f} "
                   f"| {global_t} | {_pct(g['test_accuracy'])} | {100 * g['test_macs_fraction']:.1f} |")
  return lines


def certified_lines(report: dict) -> list[str]:
  rows = report.get("certified")
  if not rows:
    return []
  r0 = rows[0]
  lines = ["", f"## Certified thresholds (Learn then Test, `{r0['policy']}`, {r0['family']} family)", "",
           f"With probability at least {1 - r0['delta']:.0%} over the validation draw, the risk on new images is at "
           "most epsilon. disagreement: the answering exit's class differs from the full network's; accuracy_loss: "
           "the full network is right and the answering exit wrong. Beside it, the setting fitted on validation for "
           "the same MACs budget, which certifies nothing.", "",
           "| risk | epsilon (%) | certified | MACs saved, val (%) | risk on test (%) | MACs saved, test (%) "
           "| budget-fitted: risk on test (%) | MACs saved, test (%) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['risk']} | {100 * r['epsilon']:g} | {'yes' if r['certified'] else 'no'} "
                 f"| {100 * r['val_macs_saved']:z.1f} | {_pct(r['test_risk'])} | {100 * r['test_macs_saved']:z.1f} "
                 f"| {_pct(r['budget_fitted_test_risk'])} | {100 * r['budget_fitted_test_macs_saved']:z.1f} |")
  return lines


def history_lines(report: dict) -> list[str]:
  """The validation split during training (`eejax.history.summary`): is the final exit past its best?"""
  rows = report.get("history")
  if not rows:
    return []
  every = report["history_every_epochs"]
  every = "epoch" if every == 1 else f"{every:g} epochs"
  lines = ["", "## Validation during training", "",
           f"Every exit on the validation split ({report['splits']['val']} images, inference mode) after about "
           f"every {every}, {rows[0]['points']} times (training.png). Training accuracy: its mean since the "
           "validation before the last, on augmented batches in training mode. Everything else in this report uses "
           "the final weights.", ""]
  return lines + history_table(rows)


def history_table(rows) -> list[str]:
  """`eejax.history.summary`'s rows as a Markdown table."""
  lines = ["| exit | best validation accuracy (%) | at epoch | final validation accuracy (%) | at epoch "
           "| final training accuracy (%) |", "|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['exit']} | {_pct(r['best_val_accuracy'])} | {r['best_epoch']:.1f} "
                 f"| {_pct(r['final_val_accuracy'])} | {r['final_epoch']:.1f} | {_pct(r['final_train_accuracy'])} |")
  return lines


def _calibration_lines(report: dict) -> list[str]:
  cal = report.get("calibration")
  if not cal:
    return []
  lines = ["", "## Calibration per exit", "",
           "Temperature fitted on validation; expected calibration error (15 bins) on test.", "",
           "| exit | temperature | ECE (%) | ECE after scaling (%) |", "|---:|---:|---:|---:|"]
  for e, (t, before, after) in enumerate(zip(cal["temperature"], cal["test_ece"], cal["test_ece_scaled"])):
    lines.append(f"| {e + 1} | {t:.3f} | {_pct(before)} | {_pct(after)} |")
  return lines


def _real_inference_lines(report: dict) -> list[str]:
  real = report.get("real_inference")
  if not real:
    return []
  return ["", "## Real early exit (images that exit are not computed further)", "",
          f"`max_prob` per-exit thresholds fitted for {100 * real['budget']:.0f}% of the MACs; {real['images']} test "
          f"images in batches of {real['batch_size']} on {real['device']}.", "",
          "| full network (images/s) | early exit (images/s) | measured speedup | MACs-predicted speedup |",
          "|---:|---:|---:|---:|",
          f"| {real['full_images_per_s']:,.0f} | {real['early_exit_images_per_s']:,.0f} "
          f"| {real['measured_speedup']:.2f}x | {real['macs_predicted_speedup']:.2f}x |", "",
          f"Exit decisions differing from the simulated policy: {real['exit_mismatches_vs_simulated']}."]


def plot_curve(report: dict, path: str) -> None:
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for name, policy in report["policies"].items():
    curve = sorted(policy["curve"], key=lambda p: p["macs"])
    ax.plot([p["macs"] / 1e6 for p in curve], [100 * p["accuracy"] for p in curve], ".-", ms=3, lw=1,
            label=f"{name} (one point per threshold)")
  for name, rows in report.get("fitted_on_val", {}).items():
    ax.scatter([r["per_exit"]["test_macs_fraction"] * report["full_macs"] / 1e6 for r in rows],
               [100 * r["per_exit"]["test_accuracy"] for r in rows], marker="D", s=30, zorder=4,
               label=f"{name}, per-exit thresholds fitted on val")
  ax.scatter([e["macs"] / 1e6 for e in report["exits"]], [100 * e["accuracy"] for e in report["exits"]],
             marker="*", s=120, c="k", zorder=3, label="each exit alone")
  for e in report["exits"]:
    ax.annotate(f"exit {e['exit']}", (e["macs"] / 1e6, 100 * e["accuracy"]), textcoords="offset points",
                xytext=(4, -12), fontsize=8)
  ax.set_xlabel("mean MACs per image (millions)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"{report['model']} ({report['method']}) on {report['dataset']}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  save_figure(fig, path)


def save_figure(fig, path: str, dpi=None) -> None:
  """`fig` as the PNG `path` and, for a paper, as vector graphics beside it (the same name with .pdf); closes it."""
  fig.tight_layout()
  try:
    for target in (path, os.path.splitext(path)[0] + ".pdf"):
      with workdirs.replacing(target) as tmp:  # an interrupted save leaves the previous figure
        fig.savefig(tmp, dpi=dpi if target == path else None)
  finally:
    plt.close(fig)


def write_files(workdir: str, report: dict, text: str, plot, default=None) -> None:
  """report.json, report.md (`text`), its tables as report.tex, and curve.png (`plot(report, path)`): every job's
  report files."""
  os.makedirs(workdir, exist_ok=True)
  workdirs.write_json(os.path.join(workdir, "report.json"), report, indent=2, default=default)
  latex.write_markdown(os.path.join(workdir, "report.md"), text)
  plot(report, os.path.join(workdir, "curve.png"))


def write_all(report: dict, workdir: str) -> None:
  write_files(workdir, report, markdown(report), plot_curve)
