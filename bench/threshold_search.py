"""Threshold search: eejax's batched search against the SDN / MSDNet loop, on the same logits.

  python bench/threshold_search.py [--logits WORKDIR/logits.npz] [--settings 100]

Without --logits, uses seeded synthetic 10,000 x 4-exit, 10-class logits. The
peer re-implements the dynamic evaluation of MSDNet (adaptive_inference.py)
and SDN: for each threshold setting, a Python loop over images, and for each
image over exits until one is confident enough. Both evaluate the same K
per-exit threshold settings; the script checks that the results are identical
and prints both timings and their ratio. Hardware is printed with the numbers.
"""
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from eejax import calibration, cli, policies, workdirs


def msdnet_search(max_preds, argmax_preds, targets, flops, threshold_KxE):
  """MSDNet's dynamic_eval_with_threshold, once per setting: element-wise indexing and .item().

  numpy arrays stand in for the torch tensors of the original; exits are
  counted per stage and the expected cost is computed from the counts.
  """
  n_stage, n_sample = max_preds.shape
  accuracy, macs = [], []
  for T in threshold_KxE:
    acc, exp = 0, np.zeros(n_stage)
    for i in range(n_sample):
      gold_label = targets[i]
      for k in range(n_stage):
        if k == n_stage - 1 or max_preds[k][i].item() >= T[k]:  # force the sample to exit at k
          if int(gold_label.item()) == int(argmax_preds[k][i].item()):
            acc += 1
          exp[k] += 1
          break
    accuracy.append(acc / n_sample)
    macs.append(float((exp * flops).sum() / n_sample))
  return np.array(accuracy), np.array(macs)


def loop_search(conf_ExN, pred_ExN, labels_N, cost_E, threshold_KxE):
  """The same loops over plain Python lists: the fastest a pure-Python loop gets."""
  num_exits, n = len(conf_ExN), len(conf_ExN[0])
  accuracy, macs = [], []
  for t in threshold_KxE:
    correct, spent = 0, 0.0
    for i in range(n):
      for k in range(num_exits):
        if k == num_exits - 1 or conf_ExN[k][i] >= t[k]:
          correct += int(pred_ExN[k][i] == labels_N[i])
          spent += cost_E[k]
          break
    accuracy.append(correct / n)
    macs.append(spent / n)
  return np.array(accuracy), np.array(macs)


def synthetic(n=10_000, exits=4, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  logits = rng.normal(size=(exits, n, classes)).astype(np.float32)
  for k in range(exits):
    logits[k, np.arange(n), labels] += 1.0 + 0.8 * k
  return logits, labels, np.array([0.2, 0.45, 0.7, 1.0][:exits]) * 1e8


def main():
  parser = cli.ArgumentParser("bench/threshold_search.py", description=__doc__.splitlines()[0])
  parser.add_argument("--logits", help="a run's logits.npz (test split is used)")
  parser.add_argument("--settings", type=cli.positive(int), default=100, help="per-exit threshold settings K")
  args = parser.parse_args()
  if args.logits:
    saved = workdirs.read_npz(args.logits, ("test_logits", "test_labels", "cumulative_macs"))
    logits, labels, cost = saved["test_logits"], saved["test_labels"], saved["cumulative_macs"].astype(np.float64)
  else:
    logits, labels, cost = synthetic()
  conf, pred = jax.device_get(policies.max_prob(jnp.asarray(logits)))
  rng = np.random.default_rng(1)
  threshold = np.sort(rng.uniform(0.3, 1.0, (args.settings, logits.shape[0])), axis=0).astype(np.float32)

  start = time.perf_counter()
  ours = jax.block_until_ready(calibration.search(conf, pred, labels, cost, threshold))
  compile_s = time.perf_counter() - start
  repeats = 20
  start = time.perf_counter()
  for _ in range(repeats):
    ours = jax.block_until_ready(calibration.search(conf, pred, labels, cost, threshold))
  ours_s = (time.perf_counter() - start) / repeats

  start = time.perf_counter()
  peer = msdnet_search(conf, pred, labels, np.asarray(cost), threshold)
  peer_s = time.perf_counter() - start
  conf_l, pred_l, labels_l, cost_l = conf.tolist(), pred.tolist(), labels.tolist(), cost.tolist()
  start = time.perf_counter()
  lists = loop_search(conf_l, pred_l, labels_l, cost_l, threshold.tolist())
  lists_s = time.perf_counter() - start

  e, n, _ = logits.shape
  # Same decisions: the same number of correct images and the same mean cost for every setting.
  same = lambda a, b: np.array_equal(np.round(np.asarray(a[0], np.float64) * n), np.round(b[0] * n)) and np.allclose(
      np.asarray(a[1]), b[1], rtol=1e-5)
  identical = same(ours, peer) and same(ours, lists)
  print(f"hardware: {jax.devices()[0].device_kind} ({jax.default_backend()}), host {platform.processor() or platform.machine()}, "
        f"jax {jax.__version__}")
  print(f"logits: {n} images x {e} exits; {args.settings} per-exit threshold settings")
  print(f"eejax calibration.search : {1e3 * ours_s:10.2f} ms per search (compile {compile_s:.2f} s, once)")
  print(f"MSDNet/SDN loop (peer)   : {1e3 * peer_s:10.2f} ms per search   ratio peer / eejax: {peer_s / ours_s:8.1f}x")
  print(f"same loop on Python lists: {1e3 * lists_s:10.2f} ms per search   ratio lists / eejax: {lists_s / ours_s:7.1f}x")
  print(f"identical accuracy and MACs in all three: {identical}")
  if not identical:
    raise SystemExit("results differ")


if __name__ == "__main__":
  cli.guarded(main, "bench/threshold_search.py")  # a mistake is one line, never a traceback
