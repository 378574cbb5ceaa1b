"""Evaluation after training: every exit's logits in one jitted pass, then array work.

Writes to the workdir: report.json, report.md, curve.png (see `eejax.report`)
and logits.npz (val and test logits_ExNxC with labels, for later calibration).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from eejax import input_pipeline, policies, report, sharding
from eejax.data import Dataset
from eejax.flops import ExitMacs


def make_predict_fn(model, mesh):
  """jit: (variables, x_BxHxWx3 uint8, mean_C, std_C) -> logits_ExBxC, batch sharded over devices."""
  def predict(variables, x_BxHxWx3, mean_C, std_C):
    logits_ExBxC, _ = model.apply(variables, input_pipeline.normalize(x_BxHxWx3, mean_C, std_C), train=False)
    return logits_ExBxC
  batch = sharding.batch_sharded(mesh)
  return jax.jit(predict, in_shardings=(sharding.replicated(mesh), batch, None, None),
                 out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")))


def predict(predict_fn, variables, images_NxHxWx3, mean_C, std_C, batch_size: int) -> np.ndarray:
  """logits_ExNxC (float32, host) over all images, in fixed-size batches (the last one padded)."""
  n = images_NxHxWx3.shape[0]
  out = []
  for start in range(0, n, batch_size):
    x = images_NxHxWx3[start:start + batch_size]
    valid = x.shape[0]
    if valid < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - valid, *x.shape[1:]), x.dtype)])
    out.append(np.asarray(jax.device_get(predict_fn(variables, x, mean_C, std_C)))[:, :valid])
  return np.concatenate(out, axis=1)


def exit_accuracy(logits_ExNxC, labels_N) -> np.ndarray:
  return (np.argmax(logits_ExNxC, -1) == labels_N[None]).mean(-1)


def curve_thresholds(conf_ExN, num: int) -> np.ndarray:
  """Quantiles of the early exits' confidences (points spread evenly in cost), plus 0 and 1.01."""
  early = np.asarray(conf_ExN[:-1]).ravel()
  quantiles = np.quantile(early, np.linspace(0, 1, num)) if early.size else np.zeros(0)
  return np.unique(np.concatenate([[0.0], quantiles, [1.01]])).astype(np.float32)


def budget_accuracy(macs_K, accuracy_K, full_macs: int, budgets) -> dict:
  """Best accuracy among curve points whose mean MACs <= budget * full_macs (None if none)."""
  out = {}
  for b in budgets:
    ok = np.asarray(macs_K) <= b * full_macs
    out[str(float(b))] = float(np.max(np.asarray(accuracy_K)[ok])) if ok.any() else None
  return out


def max_prob_report(logits_ExNxC, labels_N, macs: ExitMacs, num_thresholds: int, budgets) -> dict:
  conf_ExN, pred_ExN = policies.max_prob(jnp.asarray(logits_ExNxC))
  thresholds_K = curve_thresholds(conf_ExN, num_thresholds)
  accuracy_K, macs_K = jax.device_get(policies.sweep(
      conf_ExN, pred_ExN == jnp.asarray(labels_N)[None], np.asarray(macs.cumulative, np.float32), thresholds_K))
  curve = [{"threshold": float(t), "accuracy": float(a), "macs": float(m)}
           for t, a, m in zip(thresholds_K, accuracy_K, macs_K)]
  return {"curve": curve, "budgets": budget_accuracy(macs_K, accuracy_K, macs.full, budgets)}


def evaluate_and_report(model, variables, ds: Dataset, macs: ExitMacs, config, workdir: str, mesh,
                        method: str | None = None, extra: dict | None = None) -> dict:
  """Computes every exit's val and test logits once, then the report; writes the files."""
  mean_C, std_C = input_pipeline.channel_stats(ds.train.images_NxHxWx3)
  predict_fn = make_predict_fn(model, mesh)
  logits = {name: predict(predict_fn, variables, split.images_NxHxWx3, mean_C, std_C, config.eval.batch_size)
            for name, split in (("val", ds.val), ("test", ds.test))}
  acc_E = exit_accuracy(logits["test"], ds.test.labels_N)
  result = {
      "method": method or config.scheme,
      "model": config.model.name,
      "dataset": config.data.source,
      "macs_note": "multiply-accumulates per image; an exit's cost includes every head tried before it",
      "full_macs": macs.full,
      "exits": [{"exit": e + 1, "accuracy": float(a), "macs": macs.cumulative[e], "head_macs": macs.head[e]}
                for e, a in enumerate(acc_E)],
      "policies": {"max_prob": max_prob_report(logits["test"], ds.test.labels_N, macs,
                                               config.eval.num_thresholds, config.eval.budgets)},
      "splits": {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test), "val_source": ds.val_source},
      **(extra or {}),
  }
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "logits.npz"), val_logits=logits["val"], val_labels=ds.val.labels_N,
             test_logits=logits["test"], test_labels=ds.test.labels_N, cumulative_macs=np.asarray(macs.cumulative))
    report.write_all(result, workdir)
  return result
