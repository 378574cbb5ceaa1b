"""The public API: one call each to train, load a run, fit thresholds, predict with real early exit, export.

Named so that they never collide with the package's modules (`eejax.train`, `eejax.export`).

  import eejax
  run = eejax.load_run("/tmp/cpu")
  threshold_ExC = eejax.fit_thresholds(run, budget=0.5)             # or target_accuracy=0.70
  pred_N, exit_N, cost_N = eejax.predict(run, images_NxHxWx3, threshold_ExC)
  eejax.export_run(run, "/tmp/cpu/export", threshold_ExC, formats=("stablehlo",))

Thresholds are fitted on the run's validation logits (saved with the run, so
nothing is decoded again); images are uint8 NxHxWx3 as the dataset stores them.
"""
import os

import ml_collections
import numpy as np

from eejax import (calibration, collectives, distributed, evaluate, export as exports, inference, policies, risk,
                   schemes, thresholds, validate, workdirs, xla_cache)
from eejax.errors import UserError
from eejax.flops import exit_macs
from eejax.run import Run, load_run

__all__ = ["Run", "certify_thresholds", "export_run", "fit_thresholds", "load_run", "predict", "train_and_evaluate"]


def train_and_evaluate(config, workdir: str) -> dict:
  """Checks the config's names, then runs its scheme's job (the training loop, or BTS-EE's); returns the report."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"config is a {type(config).__name__}; give an ml_collections.ConfigDict, e.g. "
                    "configs.cifar10.get_config('cpu')")
  if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
    raise UserError(f"workdir={workdir!r}: give the path of a folder for the run")
  workdir = os.fspath(workdir)
  validate.check_config(config)
  job = schemes.get(config.scheme).job
  if job is None:
    from eejax import train as loop  # pylint: disable=g-import-not-at-top  # keeps `import eejax` light
    job = loop.train_and_evaluate
  distributed.initialize(distributed.Cluster(from_environment=config.distributed))  # unless the command line did
  xla_cache.off_where_loads_hang()  # before the first collective, whoever joined the job
  with distributed.watch_peers(workdir):  # a process that fails or goes silent ends the others with one line
    collectives.agree(_paths_problem(config, workdir))
    workdirs.check_shared(workdir)
    with workdirs.lock(workdir):  # one job at a time in a workdir
      xla_cache.enable(config.get("compile_cache_dir", ""), config.get("compile_cache_max_gb", 0.0))
      return job(config, workdir)


def _paths_problem(config, workdir: str) -> str | None:
  """Why this process cannot write the workdir, the data cache or the compile cache, or None."""
  try:
    workdirs.check_path(workdir, "workdir", "--workdir")
    if config.data.cache_dir:
      workdirs.check_path(config.data.cache_dir, "data cache", "--config.data.cache_dir")
    if config.get("compile_cache_dir") and not xla_cache.jax_folder():  # JAX's own folder wins
      workdirs.check_path(config.compile_cache_dir, "compile cache", "--config.compile_cache_dir")
  except UserError as e:
    return str(e)
  return None


def fit_thresholds(run: Run, budget: float | None = None, target_accuracy: float | None = None,
                   policy="max_prob", save: bool = False) -> thresholds.Fitted:
  """threshold_ExC fitted on the run's validation split: the most accurate setting within `budget` (a fraction of
  the full network's MACs), or the cheapest reaching `target_accuracy`. `save` adds it to the run's thresholds.json.
  The array remembers `policy`: `predict` and `export_run` use it with that policy.
  """
  run = _a_run(run)
  calibration.check_goal(budget, target_accuracy)
  macs = exit_macs(run.model, run.spec.image_shape)
  logits_ExNxC, labels_N = evaluate.val_logits(run)
  threshold_ExC, fit = calibration.fit(logits_ExNxC, labels_N, macs.cumulative, policy,
                                       budget_macs=None if budget is None else budget * macs.full,
                                       target_accuracy=target_accuracy)
  shown = [round(float(t), 4) for t in threshold_ExC[:-1, 0]]  # not float32's 0.11749999970197678
  print(f"{policies.get(policy).name} thresholds {shown}: validation accuracy "
        f"{calibration.fit_summary(fit, macs.full, budget, target_accuracy)}")
  if save:
    goal = {"budget": float(budget)} if budget is not None else {"target_accuracy": float(target_accuracy)}
    entries = [e for e in thresholds.load(run.workdir, run.model.num_exits, run.model.num_classes, step=run.step)
               if not (e["policy"] == policies.get(policy).name and all(e.get(k) == v for k, v in goal.items()))]
    thresholds.save(run.workdir, entries + [thresholds.entry(policy, threshold_ExC, fitted_on="val", **goal,
                                                             step=run.step, val_accuracy=fit["val_accuracy"])])
  return thresholds.fitted(threshold_ExC, policy)


def certify_thresholds(run: Run, epsilon: float, delta: float = 0.1, risk_name: str = "disagreement",
                       policy="max_prob", family: str = "per_exit") -> dict:
  """The cheapest threshold_ExC whose risk on new images is at most `epsilon` with probability >= 1 - delta,
  certified on the run's validation split (`eejax.risk`: Learn then Test). Returns `risk.certify`'s dict, whose
  "threshold_ExC" remembers `policy` as `fit_thresholds`'s does."""
  run = _a_run(run)
  macs = exit_macs(run.model, run.spec.image_shape)
  logits_ExNxC, labels_N = evaluate.val_logits(run)
  out = risk.certify(logits_ExNxC, labels_N, macs.cumulative, epsilon, delta, risk_name, policy, family)
  out["threshold_ExC"] = thresholds.fitted(out["threshold_ExC"], policy)
  print(f"{'certified' if out['certified'] else 'nothing certified'}: {risk_name} <= {100 * epsilon:g}% with "
        f"probability >= {100 * (1 - delta):g}%; validation risk {100 * out['risk']:.2f}%, "
        f"{100 * (1 - out['macs'] / macs.full):z.1f}% of the MACs saved")  # z: never "-0.0%"
  return out


def predict(run: Run, images_NxHxWx3, threshold_ExC, policy=None, batch_size: int = 256):
  """(pred_N, exit_N, cost_N): real early exit, images that answer are not computed further. `policy`: the one
  the thresholds were fitted for when left out (max_prob for a plain array)."""
  run = _a_run(run)
  policy = thresholds.policy_for(threshold_ExC, policy)
  images_NxHxWx3 = np.asarray(images_NxHxWx3)
  if images_NxHxWx3.dtype != np.uint8 or images_NxHxWx3.shape[1:] != tuple(run.spec.image_shape):
    raise UserError(f"images of shape {images_NxHxWx3.shape} and type {images_NxHxWx3.dtype}; this run takes uint8 "
                    f"Nx{'x'.join(map(str, run.spec.image_shape))} images, as the dataset stores them (0 to 255)")
  if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
    raise UserError(f"batch_size={batch_size!r}: give a whole number of images of at least 1")
  mean_C, std_C = run.spec.stats
  cost_E = exit_macs(run.model, run.spec.image_shape).cumulative
  runner = inference.BatchedEarlyExit(run.model, run.variables, mean_C, std_C, cost_E,
                                      max(1, min(batch_size, len(images_NxHxWx3))))
  return runner(images_NxHxWx3, threshold_ExC, policy)


def export_run(run: Run, out_dir: str, threshold_ExC=None, policy=None, formats=("stablehlo",),
               budget: float = 0.5, num_images: int = 50, calibration_images: int = 200) -> dict:
  """Exports the run for batch-1 deployment and verifies every format; see `eejax.export`. Returns the report.

  `threshold_ExC` (e.g. from `fit_thresholds`) is the setting the calibrated latency is measured at; without it,
  the run's setting for `policy` and `budget`. `policy`: the one `threshold_ExC` was fitted for when left out
  (else max_prob). `calibration_images` training images calibrate "tflite_int8".
  `formats` is a sequence of names, or one string of them separated by commas ("stablehlo,onnx").
  """
  run = _a_run(run)
  policy = thresholds.policy_for(threshold_ExC, policy)
  formats = formats.split(",") if isinstance(formats, str) else formats
  return exports.export_and_verify(run.workdir, out_dir, tuple(formats), budget, num_images, policy,
                                   threshold_ExC=threshold_ExC, run=run, calibration_images=calibration_images)


def _a_run(run) -> Run:
  """`run` if it is a Run; a path or anything else is one line saying how to get one."""
  if isinstance(run, Run):
    return run
  how = f"eejax.load_run({os.fspath(run)!r})" if isinstance(run, (str, os.PathLike)) else "eejax.load_run(WORKDIR)"
  raise UserError(f"run is a {type(run).__name__}; give the Run that {how} returns")


def report_markdown(workdir: str) -> str:
  """The report.md of a finished run (or of an export folder)."""
  for name in ("report.md", "export_report.md"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        return f.read()
  raise FileNotFoundError(f"no report.md in {workdir}")
