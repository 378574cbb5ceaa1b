"""The BTS-EE job (scheme=boosted): a frozen backbone run, its cached features, and the branches.

`train_and_evaluate` loads the backbone named by `config.bts.backbone`, caches
the pooled features of every block on train/val/test once, then trains the
branches boosted and (with `bts.baseline`) non-boosted at every CPM margin,
writing report.json, report.md, curve.png and one loadable workdir per trained
model under `models/`. `launch/bts_grid.py` reuses `prepare` and
`run_configuration` for the 64-configuration grid. See `eejax.boosted`.
"""
import dataclasses
import os
import shutil
import signal
import time

import numpy as np

from eejax import boosted, collectives, data, report, signals, thresholds, workdirs
from eejax.boosted import Features
from eejax.errors import UserError
from eejax.flops import exit_macs
from eejax.models import MultiExitNet
from eejax.run import Run, check_frozen, load_run, save_model as save_workdir
from eejax.writers import on_main_process, say

MODES = ("boosted", "nonboosted")
LEGACY_BTS = {"cpm": "absolute", "min_support": 30}  # bts settings added later, as runs before them behaved


@dataclasses.dataclass
class Backbone:
  run: Run
  train: Features
  val: Features
  test: Features

  @property
  def num_blocks(self) -> int:
    return len(self.train.pooled)

  @property
  def image_shape(self) -> tuple:
    return self.run.spec.image_shape

  def reference(self) -> dict:
    """The backbone alone (its final classifier): test accuracy and MACs, the CPM reference."""
    full = exit_macs(self.run.model, self.image_shape).full
    accuracy = float(np.mean(np.argmax(self.test.final_logits_NxC, -1) == self.test.labels_N))
    return {"accuracy": accuracy, "macs": full}


def prepare(config, log=say) -> Backbone:
  """Loads the backbone run and the dataset, and caches every block's pooled features on each split."""
  path = config.bts.backbone
  if not path:
    raise UserError("scheme=boosted needs --config.bts.backbone=WORKDIR, the workdir of a finished eejax run "
                    "(e.g. one of configs/cifar10.py:cpu); its backbone is frozen and its final exit is the reference")
  bb = load_run(path)
  bb.check_finished("backbone")
  for key in ("val_size", "val_seed", "max_images", "test_split"):
    ours, theirs = config.data[key], bb.config.data[key]
    if ours != theirs:
      raise UserError(f"data.{key}={ours!r} differs from the backbone run's ({theirs!r}): the validation images "
                      f"must be ones the backbone never trained on; use --config.data.{key}={theirs!r}")
  ds = data.from_config(config.data)
  bb.spec.check_matches(ds.num_classes, ds.image_shape, "backbone", path, f"data.source={config.data.source!r} has")
  mean_C, std_C = bb.spec.stats
  t0 = time.perf_counter()
  features = {name: boosted.extract(bb.model, bb.variables, split.images_NxHxWx3, split.labels_N, mean_C, std_C,
                                    config.eval.batch_size)
              for name, split in (("train", ds.train), ("val", ds.val), ("test", ds.test))}
  log(f"backbone {bb.config.model.name} from {path}: pooled features of its {len(features['train'].pooled)} "
      f"blocks on {len(ds.train)}/{len(ds.val)}/{len(ds.test)} train/val/test images in "
      f"{time.perf_counter() - t0:.1f}s")
  return Backbone(bb, **features)


def run_configuration(bb: Backbone, positions, head_width: int, margins, modes, settings: boosted.Settings,
                      device_train: dict, memo: dict | None = None, save=None, finished=None,
                      log=say) -> list[dict]:
  """One row per (mode, margin): test and validation accuracy and MACs of the branches under CPM.

  `save(name, model, variables, threshold_ExC, row)`, if given, stores each
  trained model; `finished(name)` returns the row of a model stored before
  (a resumed run), or None.
  """
  positions = boosted.check_positions(positions, bb.num_blocks)
  model = boosted.branch_model(bb.run.model, positions, head_width)
  macs = exit_macs(model, bb.image_shape)
  rows = []
  for mode in modes:
    for margin in margins:
      name = f"{mode}_m{margin:g}"
      row = finished(name) if finished is not None else None
      if row is not None:
        log(f"  {name}: finished before, kept")
        rows.append(row)
        continue
      params, threshold_ExC, stages = boosted.fit_branches(bb.train, bb.val, positions, head_width, margin,
                                                           mode == "boosted", settings, device_train, memo, log=log)
      test = boosted.evaluate_split(params, positions, head_width, bb.test, threshold_ExC, macs.cumulative)
      val = boosted.evaluate_split(params, positions, head_width, bb.val, threshold_ExC, macs.cumulative)
      row = {"mode": mode, "margin": float(margin), "positions": list(positions), "head_width": head_width,
             "accuracy": test["accuracy"], "macs": test["macs"],
             "macs_reduction": macs_reduction(test["macs"], macs.full), "test": test,
             "val": {"accuracy": val["accuracy"], "macs": val["macs"]}, "exit_macs": list(macs.cumulative),
             "stages": stages, "threshold_ExC": thresholds.to_json(threshold_ExC)}
      if save is not None:
        save(name, model, boosted.stitch(bb.run.variables, params), threshold_ExC, row)
      rows.append(row)
  return rows


def paired(rows: list[dict]) -> list[dict]:
  """Boosted rows with the non-boosted row of the same configuration and margin, and their differences."""
  key = lambda r: (tuple(r["positions"]), r["head_width"], r["margin"])
  base = {key(r): r for r in rows if r["mode"] == "nonboosted"}
  out = []
  for r in rows:
    if r["mode"] == "boosted" and key(r) in base:
      b = base[key(r)]
      out.append({"positions": r["positions"], "head_width": r["head_width"], "margin": r["margin"],
                  "boosted_accuracy": r["accuracy"], "nonboosted_accuracy": b["accuracy"],
                  "boosted_macs_reduction": r["macs_reduction"], "nonboosted_macs_reduction": b["macs_reduction"],
                  "accuracy_difference": r["accuracy"] - b["accuracy"],
                  "macs_reduction_difference": r["macs_reduction"] - b["macs_reduction"]})
  return out


def markdown(report: dict) -> str:
  ref = report["reference"]
  lines = [f"# BTS-EE: {report['backbone_name']} backbone from `{report['backbone']}`", "",
           f"Reference (backbone's final classifier alone): {100 * ref['accuracy']:.2f}% test accuracy at "
           f"{ref['macs'] / 1e6:.2f} M MACs.", "",
           "| positions | width | margin | mode | test accuracy | MACs (M) | MACs saved | exit shares |",
           "|---|---|---|---|---|---|---|---|"]
  for r in report["rows"]:
    shares = " / ".join(f"{100 * s:.0f}" for s in r["test"]["exit_share"])
    lines.append(f"| {','.join(map(str, r['positions']))} | {r['head_width']} | {r['margin']:g} | {r['mode']} | "
                 f"{100 * r['accuracy']:.2f}% | {r['macs'] / 1e6:.2f} | {100 * r['macs_reduction']:z.1f}% | {shares}% |")
  pairs = paired(report["rows"])
  if pairs:
    better = sum(p["accuracy_difference"] >= 0 and p["macs_reduction_difference"] >= 0 for p in pairs)
    lines += ["", f"Boosted minus non-boosted (test): accuracy and MACs saved, in points. Boosted is at least as "
              f"good on both in {better} of {len(pairs)} configurations.", "",
              "| positions | width | margin | accuracy diff | MACs-saved diff |", "|---|---|---|---|---|"]
    lines += [f"| {','.join(map(str, p['positions']))} | {p['head_width']} | {p['margin']:g} | "
              f"{100 * p['accuracy_difference']:+z.2f} | {100 * p['macs_reduction_difference']:+z.1f} |" for p in pairs]
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
  """Test accuracy against mean MACs of every row, one series per mode, the reference as a star."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for mode, marker in zip(MODES, ("o", "x")):
    rows = sorted((r for r in result["rows"] if r["mode"] == mode), key=lambda r: r["macs"])
    if rows:
      ax.plot([r["macs"] / 1e6 for r in rows], [100 * r["accuracy"] for r in rows], marker, label=mode,
              linestyle="-" if len(rows) <= 8 else "none", alpha=0.8)
  ref = result["reference"]
  ax.plot([ref["macs"] / 1e6], [100 * ref["accuracy"]], "k*", markersize=12, label="backbone alone")
  ax.set_xlabel("mean MACs per image (M)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"BTS-EE on {result['backbone_name']}")
  ax.grid(alpha=0.3)
  ax.legend()
  report.save_figure(fig, path, dpi=150)


def save_model(path: str, config, backbone: Run, model: MultiExitNet, variables, threshold_ExC,
               margin: float) -> None:
  """A loadable eejax workdir (`eejax.run.load_run`) of the branch model, with its CPM thresholds.json."""
  settings = {**backbone.spec.model, "exit_after": list(model.exit_after), "head": "conv1d",
              "head_width": model.head_width, "ensemble_teachers": False}
  spec = dataclasses.replace(backbone.spec, model=settings)
  save_workdir(path, config, spec, variables)
  if on_main_process():
    thresholds.save(path, [thresholds.entry("max_prob", threshold_ExC, method="cpm", margin=float(margin))])


def macs_reduction(macs: float, full_macs: int) -> float:
  """The fraction of the plain backbone's MACs saved: 1 - mean MACs / full MACs."""
  return 1.0 - macs / full_macs


def _plain(o):
  """JSON for numpy values in rows (the recorded per-stage indices, numpy scalars)."""
  return o.tolist() if hasattr(o, "tolist") else str(o)


def write(result: dict, workdir: str) -> None:
  report.write_files(workdir, result, markdown(result), plot, default=_plain)


def check_same_run(config, workdir: str, free=("margins", "baseline")) -> None:
  """A workdir resumes only the run it holds: the same seed, data, positions and training settings; the bts
  settings in `free` may change (a job adds margins, `launch/bts_grid.py` sets its own axes), and so may the paths
  of caches and of the backbone (its weights are checked by `run.check_frozen`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  before = workdirs.read_json(path)
  if before.get("scheme", config.scheme) != config.scheme:
    raise UserError(f"{workdir} holds a {before['scheme']} run, not a BTS-EE one. Nothing in it was changed: give "
                    f"this job its own --workdir")
  now = workdirs.as_tree(config)
  before.setdefault("bts", {})
  for key, value in LEGACY_BTS.items():  # a run saved before the setting existed used its old behaviour
    before["bts"].setdefault(key, value)
  names = [f"bts.{k}" for k in free]
  allowed = f"only {', '.join(names[:-1])} and {names[-1]} may change on a rerun"
  if before.get("seed", config.seed) != config.seed:  # the branches' initialisation and batch order
    raise UserError(f"{workdir} holds a BTS-EE run of seed {before['seed']}, not {config.seed}; use a new --workdir "
                    f"({allowed})")
  # How the job runs may change (caches, a backbone that moved: backbone.json checks its weights), but not the
  # data's path: nothing else here tells one dataset from another of the same shape.
  moved = {k for k in workdirs.RUNS_ANY_WAY if k != "data.source"}
  for section in ("bts", "data"):
    old = {k: v for k, v in before.get(section, {}).items() if k not in free and f"{section}.{k}" not in moved}
    new = {k: v for k, v in now[section].items() if k not in free and f"{section}.{k}" not in moved}
    if old != new:
      changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise UserError(f"{workdir} holds a BTS-EE run with other {section} settings ({', '.join(changed)}); "
                      f"use a new --workdir ({allowed})")


def train_and_evaluate(config, workdir: str) -> dict:
  """scheme=boosted: every margin in bts.margins, boosted and (bts.baseline) non-boosted; report in workdir."""
  bts = config.bts
  settings = boosted.Settings.from_config(bts, seed=config.seed)
  check_same_run(config, workdir)
  bb = prepare(config)
  boosted.check_positions(bts.positions, bb.num_blocks)
  models = os.path.join(workdir, "models")
  check_frozen(workdir, "backbone", bb.run, resuming=os.path.isdir(models) and any(
      os.path.exists(os.path.join(models, name, "row.json")) for name in os.listdir(models)))
  if on_main_process():  # every process of a multi-process job computes the same; process 0 writes
    workdirs.save_config(workdir, config)
  modes = MODES if bts.baseline else MODES[:1]
  stop = signals.StopSignal()

  def save(name, model, variables, threshold_ExC, row):
    path = os.path.join(workdir, "models", name)
    if on_main_process() and os.path.exists(path):  # left by a run stopped while saving it (no row.json)
      shutil.rmtree(path)
    collectives.barrier(f"bts-save-{name}")
    save_model(path, config, bb.run, model, variables, threshold_ExC, row["margin"])
    if on_main_process():
      workdirs.write_json(os.path.join(path, "row.json"), row, indent=None, default=_plain)  # last: marks it done
    if collectives.any_process(stop.signum is not None):
      raise signals.Stopped(stop.signum or signal.SIGTERM, 0, workdir, where=f"after saving models/{name}")

  def finished(name):
    path = os.path.join(workdir, "models", name, "row.json")
    if not os.path.exists(path):
      return None
    return workdirs.read_json(path)

  with stop:
    rows = run_configuration(bb, tuple(bts.positions), bts.head_width, tuple(bts.margins), modes, settings,
                             boosted.device_arrays(bb.train), memo={}, save=save, finished=finished)
  result = {"method": "bts-ee", "backbone": bb.run.workdir, "backbone_name": bb.run.config.model.name,
            "reference": bb.reference(), "settings": dataclasses.asdict(settings), "rows": rows,
            "pairs": paired(rows)}
  if on_main_process():
    write(result, workdir)
  say(markdown(result))
  say(f"report in {workdir}/report.md; models (loadable workdirs) in {workdir}/models/")
  return result
