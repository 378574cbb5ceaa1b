"""Evaluation after training: every exit's logits in one jitted pass, then array work.

Writes to the workdir: report.json, report.md, curve.png (see `eejax.report`)
and logits.npz (val and test logits_ExNxC with labels, for later calibration).
Thresholds and temperatures are fitted on the validation split and reported on
test; the curves and their budget columns read the test split directly.
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from eejax import calibration, data, inference, input_pipeline, policies, report, risk, sharding, thresholds, workdirs
from eejax.data import Dataset
from eejax.flops import ExitMacs
from eejax.writers import Count, on_main_process, say


def make_predict_fn(model, mesh):
  """(variables, x_BxHxWx3 uint8 on the host, mean_C, std_C) -> logits_ExBxC, computed batch sharded over the
  mesh's devices and gathered on every one (so every process of a multi-process job holds all of them)."""
  def predict(variables, x_BxHxWx3, mean_C, std_C):
    logits_ExBxC, _ = model.apply(variables, input_pipeline.normalize(x_BxHxWx3, mean_C, std_C), train=False)
    return logits_ExBxC
  replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  fn = jax.jit(predict, in_shardings=(replicated, batch, replicated, replicated), out_shardings=replicated)
  return lambda variables, x_BxHxWx3, mean_C, std_C: fn(variables, sharding.put(x_BxHxWx3, batch), mean_C, std_C)


def in_batches(fn, images_NxHxWx3, batch_size: int, batch_axis: int = 0, what: str = "evaluating",
               every_s: float = 10.0):
  """fn over fixed-size batches of images (the last one padded); every output leaf on the host, trimmed to the
  real images and concatenated along batch_axis. Long work prints `what: N of M images ... ETA` every `every_s`."""
  n = images_NxHxWx3.shape[0]
  outs, count = [], Count(what, n, every_s)
  for start in range(0, n, batch_size):
    x = images_NxHxWx3[start:start + batch_size]
    valid = x.shape[0]
    if valid < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - valid, *x.shape[1:]), x.dtype)])
    outs.append(jax.tree.map(lambda a, valid=valid: np.take(a, np.arange(valid), axis=batch_axis),
                             sharding.to_host(fn(x))))
    count.add(valid)
  count.close()
  return jax.tree.map(lambda *parts: np.concatenate(parts, axis=batch_axis), *outs)


def predict(predict_fn, variables, images_NxHxWx3, mean_C, std_C, batch_size: int,
            what: str = "evaluating", every_s: float = 10.0) -> np.ndarray:
  """logits_ExNxC (float32, host) over all images, in fixed-size batches (the last one padded)."""
  return in_batches(lambda x: predict_fn(variables, x, mean_C, std_C), images_NxHxWx3, batch_size, batch_axis=1,
                    what=what, every_s=every_s)


def val_logits(run) -> tuple[np.ndarray, np.ndarray]:
  """(logits_ExNxC, labels_N) of a run's validation split: from its logits.npz, else predicted on its data."""
  path = os.path.join(run.workdir, "logits.npz")
  if os.path.exists(path):
    saved = workdirs.read_npz(path, ("val_logits", "val_labels"))
    step = int(saved["step"]) if "step" in saved else None
    if step is None or run.step is None or step == run.step:
      return saved["val_logits"], saved["val_labels"]
    say(f"{path} holds the logits of step {step}, not of the checkpoint loaded (step {run.step}): computing them "
        f"again")
  ds = data.from_config(run.config.data)
  return run_logits(run, ds.val.images_NxHxWx3, what="validation logits"), ds.val.labels_N


def run_logits(run, images_NxHxWx3, batch_size: int | None = None, what: str = "evaluating") -> np.ndarray:
  """logits_ExNxC of a loaded run's variables on uint8 images, in batches of its eval.batch_size by default."""
  mean_C, std_C = run.spec.stats
  return predict(make_predict_fn(run.model, sharding.make_mesh()), run.variables, images_NxHxWx3, mean_C, std_C,
                 batch_size or run.config.eval.batch_size, what)


def exit_accuracy(logits_ExNxC, labels_N) -> np.ndarray:
  return (np.argmax(logits_ExNxC, -1) == labels_N[None]).mean(-1)


def budget_accuracy(macs_K, accuracy_K, full_macs: int, budgets) -> dict:
  """Best accuracy among curve points whose mean MACs <= budget * full_macs (None if none)."""
  out = {}
  for b in budgets:
    ok = np.asarray(macs_K) <= b * full_macs
    out[str(float(b))] = float(np.max(np.asarray(accuracy_K)[ok])) if ok.any() else None
  return out


def policy_report(logits_ExNxC, labels_N, macs: ExitMacs, policy: str, num_thresholds: int, budgets) -> dict:
  """A global-threshold policy on one split: its curve (with the Pareto front) and budget accuracies."""
  score_ExN, pred_ExN = policies.scores(jnp.asarray(logits_ExNxC), policy)
  thresholds_K = calibration.curve_thresholds(score_ExN, policy, num_thresholds)
  accuracy_K, macs_K = jax.device_get(calibration.search(
      score_ExN, pred_ExN, jnp.asarray(labels_N), np.asarray(macs.cumulative, np.float32), thresholds_K,
      policy=policy))
  front = calibration.pareto_front(macs_K, accuracy_K)
  curve = [{"threshold": float(t), "accuracy": float(a), "macs": float(m), "pareto": bool(p)}
           for t, a, m, p in zip(thresholds_K, accuracy_K, macs_K, front)]
  return {"curve": curve, "budgets": budget_accuracy(macs_K, accuracy_K, macs.full, budgets)}


def fitted_report(val, test, macs: ExitMacs, policy: str, budgets) -> list[dict]:
  """Per-exit and global thresholds fitted on val for each budget < 1, both evaluated on test.

  Each row's "threshold_ExC" is the fitted setting in `eejax.thresholds`' JSON form.
  """
  cost_E = np.asarray(macs.cumulative, np.float32)
  (val_logits, val_labels), (test_logits, test_labels) = val, test
  val_score, val_pred = policies.scores(jnp.asarray(val_logits), policy)
  test_score, test_pred = policies.scores(jnp.asarray(test_logits), policy)
  per_exit = calibration.per_exit_candidates(val_score, policy)
  global_k = calibration.curve_thresholds(val_score, policy)
  global_kxe = np.repeat(global_k[:, None], per_exit.shape[1], axis=1)
  num_exits, num_classes = np.shape(val_logits)[0], np.shape(val_logits)[-1]
  out = []
  for budget in (b for b in budgets if b < 1):
    row = {"budget": float(budget)}
    for name, candidates in (("per_exit", per_exit), ("global", global_kxe)):
      t_E, val_acc, val_macs = calibration.fit_budget(val_score, val_pred, val_labels, cost_E, candidates,
                                                      budget * macs.full, policy)
      t_ExC = thresholds.per_exit(t_E, num_exits, num_classes, policy)
      acc, spent = jax.device_get(calibration.search(test_score, test_pred, jnp.asarray(test_labels), cost_E,
                                                     t_ExC[None], policy=policy))
      row[name] = {"threshold_ExC": thresholds.to_json(t_ExC), "fits_budget_on_val": val_macs <= budget * macs.full,
                   "val_accuracy": val_acc,
                   "val_macs_fraction": val_macs / macs.full, "test_accuracy": float(acc[0]),
                   "test_macs_fraction": float(spent[0]) / macs.full}
    out.append(row)
  return out


def risk_report(val, test, macs: ExitMacs, eval_cfg, policy: str = "max_prob") -> list[dict]:
  """Per risk and epsilon: the thresholds certified on val (Learn then Test), their test risk and MACs, and the
  budget-fitted setting at the same validation MACs beside them (which certifies nothing)."""
  (val_logits, val_labels), (test_logits, test_labels) = val, test
  cost_E = np.asarray(macs.cumulative, np.float32)
  # The budget-fitted alternative: the per-exit candidates scored on val once, one pick per certified budget.
  score_ExN, pred_ExN = policies.scores(jnp.asarray(val_logits), policy)
  candidates_KxE = calibration.per_exit_candidates(score_ExN, policy)
  accuracy_K, macs_K = jax.device_get(calibration.search(score_ExN, pred_ExN, jnp.asarray(val_labels), cost_E,
                                                         candidates_KxE, policy=policy))
  num_exits, num_classes = np.shape(val_logits)[0], np.shape(val_logits)[-1]
  rows = []
  for name in eval_cfg.risks:
    certified = risk.certify_each(val_logits, val_labels, cost_E, eval_cfg.risk_epsilons, eval_cfg.risk_delta, name,
                                  policy, eval_cfg.risk_family)
    for eps, out in zip(eval_cfg.risk_epsilons, certified):
      test_risk, test_macs = risk.risk_of(out["threshold_ExC"], test_logits, test_labels, cost_E, name, policy)
      budget_E = candidates_KxE[calibration.pick_budget(accuracy_K, macs_K, out["macs"])]
      budget_t = thresholds.per_exit(budget_E, num_exits, num_classes, policy)
      budget_risk, budget_macs = risk.risk_of(budget_t, test_logits, test_labels, cost_E, name, policy)
      rows.append({"risk": name, "epsilon": eps, "delta": eval_cfg.risk_delta, "policy": policy,
                   "family": eval_cfg.risk_family, "certified": out["certified"], "val_risk": out["risk"],
                   "val_macs_saved": 1 - out["macs"] / macs.full, "test_risk": test_risk,
                   "test_macs_saved": 1 - test_macs / macs.full, "budget_fitted_test_risk": budget_risk,
                   "budget_fitted_test_macs_saved": 1 - budget_macs / macs.full,
                   "threshold_ExC": thresholds.to_json(out["threshold_ExC"])})
  return rows


def calibration_error_report(val, test) -> dict:
  """Per-exit temperatures fitted on val, and test ECE before and after scaling."""
  (val_logits, val_labels), (test_logits, test_labels) = val, test
  temperature_E = calibration.fit_temperature(jnp.asarray(val_logits), jnp.asarray(val_labels))
  before = calibration.expected_calibration_error(jnp.asarray(test_logits), jnp.asarray(test_labels))
  after = calibration.expected_calibration_error(np.asarray(test_logits) / np.asarray(temperature_E)[:, None, None],
                                                 jnp.asarray(test_labels))
  return {"temperature": np.asarray(temperature_E).tolist(), "test_ece": np.asarray(before).tolist(),
          "test_ece_scaled": np.asarray(after).tolist()}


def real_inference_report(model, variables, images_NxHxWx3, mean_C, std_C, macs: ExitMacs, threshold_ExC,
                          batch_size: int, simulated_exit_N) -> dict:
  """Measured images/s of real early exit over the test set against the full network in batches.

  Each is run once over the whole set first, so every shape it meets is compiled before the timed pass.
  """
  batch_size = min(batch_size, images_NxHxWx3.shape[0])
  runner = inference.BatchedEarlyExit(model, variables, mean_C, std_C, macs.cumulative, batch_size)
  n = images_NxHxWx3.shape[0] // batch_size * batch_size
  images = images_NxHxWx3[:n]
  full = lambda: jax.block_until_ready([runner.full(images[i:i + batch_size]) for i in range(0, n, batch_size)])
  early = lambda: runner(images, threshold_ExC, "max_prob")
  full_rate, _ = timed_rate(full, n)
  exit_rate, (_, exits, _) = timed_rate(early, n)
  mean_cost = float(np.asarray(macs.cumulative)[exits].mean())
  return {"device": jax.devices()[0].device_kind, "batch_size": batch_size, "images": n,
          "full_images_per_s": full_rate, "early_exit_images_per_s": exit_rate,
          "measured_speedup": exit_rate / full_rate, "macs_predicted_speedup": macs.full / mean_cost,
          "exit_mismatches_vs_simulated": int(np.sum(exits != simulated_exit_N[:n]))}


def timed_rate(fn, n: int, repeats: int = 1):
  """(n / seconds of the fastest of `repeats` calls after one untimed call, the last output)."""
  out = fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return n / best, out


def evaluate_and_report(model, variables, ds: Dataset, macs: ExitMacs, config, workdir: str, mesh, stats,
                        method: str | None = None, extra: dict | None = None, step: int | None = None,
                        predict_fn=None, val_logits=None) -> dict:
  """Computes every exit's val and test logits once, then the report; writes the files.

  stats: the run's (mean_C, std_C), `eejax.run.RunSpec.stats`. Besides the report, thresholds.json gets every
  per-exit setting fitted on validation (one per fitted policy and budget). `step`, the checkpoint step of
  `variables`, is written into every file, so that a later reader never pairs them with another step's weights.
  `predict_fn` (`make_predict_fn`'s, already compiled) and `val_logits` (of these very `variables`, from the
  validation at the end of training) spare a compilation and a pass over the validation split.
  """
  mean_C, std_C = stats
  predict_fn = predict_fn or make_predict_fn(model, mesh)
  logits = {} if val_logits is None else {"val": val_logits}
  for name, split in (("val", ds.val), ("test", ds.test)):
    if name not in logits:
      logits[name] = predict(predict_fn, variables, split.images_NxHxWx3, mean_C, std_C, config.eval.batch_size,
                             f"evaluating the {name} split", config.log.every_s)
  acc_E = exit_accuracy(logits["test"], ds.test.labels_N)
  val, test = (logits["val"], ds.val.labels_N), (logits["test"], ds.test.labels_N)
  fitted = {p: fitted_report(val, test, macs, p, config.eval.budgets) for p in config.eval.fit_policies}
  result = {
      "method": method or config.scheme,
      "step": step,
      "model": config.model.name,
      "dataset": config.data.source,
      "macs_note": "multiply-accumulates per image; an exit's cost includes every head tried before it",
      "full_macs": macs.full,
      "exits": [{"exit": e + 1, "accuracy": float(a), "macs": macs.cumulative[e], "head_macs": macs.head[e]}
                for e, a in enumerate(acc_E)],
      "policies": {p: policy_report(logits["test"], ds.test.labels_N, macs, p, config.eval.num_thresholds,
                                    config.eval.budgets) for p in config.eval.policies},
      "fitted_on_val": fitted,
      "calibration": calibration_error_report(val, test),
      "certified": risk_report(val, test, macs, config.eval) if len(macs.cumulative) > 1 else [],
      "splits": {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test), "val_source": ds.val_source},
      **(extra or {}),
  }
  if config.eval.real_inference and "max_prob" in fitted and fitted["max_prob"]:
    row = min(fitted["max_prob"], key=lambda r: abs(r["budget"] - 0.5))
    threshold_ExC = thresholds.from_json(row["per_exit"]["threshold_ExC"], "max_prob")
    score, pred = policies.scores(jnp.asarray(logits["test"]), "max_prob")
    simulated = np.asarray(policies.first_exit(score, pred, threshold_ExC[None]))[0]
    # Measured on one device of this process: early exit is a per-device matter, and its work is local.
    local = variables if jax.process_count() == 1 else jax.device_put(sharding.to_host(variables),
                                                                       jax.local_devices()[0])
    result["real_inference"] = {"budget": row["budget"], **real_inference_report(
        model, local, ds.test.images_NxHxWx3, mean_C, std_C, macs, threshold_ExC,
        config.eval.batch_size, simulated)}
  if on_main_process():
    workdirs.write_npz(os.path.join(workdir, "logits.npz"), step=-1 if step is None else step,
             val_logits=logits["val"], val_labels=ds.val.labels_N,
             test_logits=logits["test"], test_labels=ds.test.labels_N, cumulative_macs=np.asarray(macs.cumulative))
    report.write_all(result, workdir)
    thresholds.save(workdir, [{"policy": policy, "threshold_ExC": row["per_exit"]["threshold_ExC"],
                               "budget": row["budget"], "fitted_on": "val", "step": step,
                               "val_accuracy": row["per_exit"]["val_accuracy"]}
                              for policy, rows in fitted.items() for row in rows])
  return result
