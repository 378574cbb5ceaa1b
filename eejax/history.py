"""A run's history: every exit's validation accuracy during training, read back from metrics.jsonl.

The training loop scores the validation split every `eval.every_epochs` epochs
(`validation_metrics`, written as `val/...` lines beside the `train/...` ones).
After training, `summary` gives each exit's best and final validation accuracy
(is the final exit still improving, or past its best?) and `plot` draws
`training.png`: per exit, the training accuracy over each epoch (augmented,
dashed) against the validation accuracy at its end (solid).

  python -m eejax.history --workdir W [--out DIR]

prints that table for a run, finished or still training, and draws its
training.png (into DIR, by default the workdir): how a run is going, without
TensorBoard.
"""
import json
import os

import numpy as np


def validation_metrics(logits_ExNxC, labels_N, epoch: float) -> dict:
  """{'val/accuracy_exitK', 'val/ce_exitK' for every exit, 'val/epoch'}: float64 numpy, independent of JAX."""
  logits_ExNxC = np.asarray(logits_ExNxC, np.float64)
  shifted_ExNxC = logits_ExNxC - logits_ExNxC.max(-1, keepdims=True)
  logp_ExNxC = shifted_ExNxC - np.log(np.exp(shifted_ExNxC).sum(-1, keepdims=True))
  labels_N = np.asarray(labels_N)
  ce_E = -np.take_along_axis(logp_ExNxC, labels_N[None, :, None], -1)[..., 0].mean(-1)
  acc_E = (logits_ExNxC.argmax(-1) == labels_N[None]).mean(-1)
  out = {"val/epoch": float(epoch)}
  for e, (acc, ce) in enumerate(zip(acc_E, ce_E)):
    out[f"val/accuracy_exit{e + 1}"], out[f"val/ce_exit{e + 1}"] = float(acc), float(ce)
  return out


def read(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl ([] without one); a line cut short or garbled by a crash is left out."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and "step" in record:
        records.append(record)
  return records


def series(records, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps_K, values_K) of one metric, by step; a step written twice (a resumed run trains the steps after its
  last checkpoint again) keeps the value written last."""
  by_step = {int(r["step"]): float(r[name]) for r in records if name in r}
  steps_K = np.array(sorted(by_step), dtype=np.int64)
  return steps_K, np.array([by_step[s] for s in steps_K], dtype=np.float64)


def interval_means(records, name: str, at_steps_K) -> np.ndarray:
  """values_K: the mean of a per-chunk training metric over the steps since the previous of `at_steps_K` (each
  chunk weighted by its steps; NaN where none); the training accuracy over the epoch before each validation."""
  steps_J, values_J = series(records, name)
  size_J = np.diff(steps_J, prepend=0)
  out, previous = [], 0
  for step in at_steps_K:
    inside = (steps_J > previous) & (steps_J <= step)
    out.append(np.average(values_J[inside], weights=size_J[inside]) if inside.any() else np.nan)
    previous = step
  return np.array(out, dtype=np.float64)


def epochs(records) -> dict:
  """{step: epoch} of every validation during training."""
  return dict(zip(*(a.tolist() for a in series(records, "val/epoch"))))


def missed(records, step: int, every: int, total_steps: int) -> bool:
  """Whether a run resuming at `step` lacks the validation of its last interval: the loop validates at the first
  chunk boundary on or after every multiple of `every` steps and at `total_steps`, but not when a stop lands
  there. The records of steps after `step` (trained before a crash, to be trained again) do not count."""
  steps_K = series(records, "val/epoch")[0]
  due = step if step == total_steps else step // every * every
  return due > 0 and not np.any((steps_K >= due) & (steps_K <= step))


def num_exits(records) -> int:
  return sum(1 for name in {k for r in records for k in r} if name.startswith("val/accuracy_exit"))


def summary(records) -> list[dict]:
  """Per exit: the best validation accuracy and its epoch, the last one, and the last training accuracy; [] when
  the run never validated during training."""
  epoch_of = epochs(records)
  rows = []
  for e in range(1, num_exits(records) + 1):
    steps_K, acc_K = series(records, f"val/accuracy_exit{e}")
    best = int(np.argmax(acc_K))  # the first of equal bests
    train = interval_means(records, f"train/accuracy_exit{e}", steps_K)[-1]
    rows.append({"exit": e, "best_val_accuracy": float(acc_K[best]), "best_epoch": epoch_of[int(steps_K[best])],
                 "final_val_accuracy": float(acc_K[-1]), "final_epoch": epoch_of[int(steps_K[-1])],
                 "final_train_accuracy": None if np.isnan(train) else float(train), "points": len(acc_K)})
  return rows


def plot(records, path: str, title: str = "") -> bool:
  """training.png (and .pdf) at `path`: per exit, the training accuracy over each interval (dashed) and the
  validation accuracy at its end (solid), against epochs. Returns False, drawing nothing, when the run never validated during training."""
  if not num_exits(records):
    return False
  from eejax import report  # pylint: disable=g-import-not-at-top  (matplotlib only where a figure is drawn)
  steps_K, epochs_K = series(records, "val/epoch")
  fig, ax = report.plt.subplots(figsize=(6, 4), dpi=120)
  for e in range(1, num_exits(records) + 1):
    _, acc_K = series(records, f"val/accuracy_exit{e}")
    line, = ax.plot(epochs_K, 100 * acc_K, ".-", ms=3, lw=1.2, label=f"exit {e}, validation")
    ax.plot(epochs_K, 100 * interval_means(records, f"train/accuracy_exit{e}", steps_K), "--", lw=0.8,
            color=line.get_color(), label=f"exit {e}, training (augmented)")
  ax.set_xlabel("epoch")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right", ncol=2)
  report.save_figure(fig, path)
  return True


def show(workdir: str, out: str | None = None) -> str:
  """The validation table of `workdir` so far, as Markdown; draws OUT/training.png (OUT: the workdir)."""
  from eejax import report  # pylint: disable=g-import-not-at-top
  from eejax import workdirs  # pylint: disable=g-import-not-at-top
  from eejax.errors import UserError  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise UserError(f"{workdir!r} is not a folder: give --workdir of a run")
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    if not os.path.exists(os.path.join(workdir, "config.json")):
      raise workdirs.not_a_run(workdir)
    raise UserError(f"{workdir} has no metrics.jsonl: its run has not logged yet, or was not trained by eejax.main "
                    "(BTS-EE's branches, trained on a frozen backbone, keep no history; its report.md has the results)")
  records = read(workdir)
  rows = summary(records)
  if not rows:
    raise UserError(f"{workdir}/metrics.jsonl holds no validation during training yet: a run scores the validation "
                    "split every eval.every_epochs epochs (1 by default); wait for the first, or train with "
                    "eval.every_epochs > 0")
  out = out or workdir
  workdirs.check_path(out, "figure", "--out")
  os.makedirs(out, exist_ok=True)
  plot(records, os.path.join(out, "training.png"), workdir)
  return "\n".join(report.history_table(rows) + ["", f"Figure: {os.path.join(out, 'training.png')}"])


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from eejax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {' '.join(argv[1:])}; give --workdir W [--out DIR]", "eejax.history")
  f = flags.FLAGS
  if not f.workdir:
    cli.fail("give --workdir of a run, finished or still training", "eejax.history")
  print(cli.guarded(lambda: show(f.workdir, f.out), "eejax.history"))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from eejax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "A run's workdir, finished or still training.")
  flags.DEFINE_string("out", None, "Folder for training.png and training.pdf (default: the workdir).")
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, "eejax.history"))
