"""Max-probability exit policy against a plain numpy loop, ties and fallback included."""
import jax
import numpy as np

from eejax import policies


def loop_reference(conf, correct, cost, thresholds):
  acc, macs = [], []
  for t in thresholds:
    hits, spent = 0, 0.0
    for b in range(conf.shape[1]):
      e = next((e for e in range(conf.shape[0]) if conf[e, b] >= t), conf.shape[0] - 1)
      hits += correct[e, b]
      spent += cost[e]
    acc.append(hits / conf.shape[1])
    macs.append(spent / conf.shape[1])
  return np.array(acc), np.array(macs)


def test_sweep_matches_loop_with_ties_and_fallback():
  rng = np.random.default_rng(0)
  conf = rng.choice([0.2, 0.5, 0.8, 1.0], size=(4, 300)).astype(np.float32)  # many exact ties with thresholds
  correct = rng.random((4, 300)) < 0.7
  cost = np.array([10.0, 25.0, 60.0, 100.0], np.float32)
  thresholds = np.array([0.0, 0.2, 0.5, 0.8, 0.9, 1.0, 1.01], np.float32)
  acc, macs = jax.device_get(policies.sweep(conf, correct, cost, thresholds))
  ref_acc, ref_macs = loop_reference(conf, correct, cost, thresholds)
  np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)
  np.testing.assert_allclose(macs, ref_macs, rtol=1e-5)
  assert macs[0] == 10.0 and macs[-1] == 100.0  # threshold 0: all at exit 1; above 1: all at the last


def test_max_prob_confidence_and_prediction():
  logits = np.array([[[2.0, 0.0], [0.0, 0.0]]], np.float32)
  conf, pred = policies.max_prob(logits)
  np.testing.assert_allclose(conf, [[np.exp(2) / (1 + np.exp(2)), 0.5]], rtol=1e-6)
  assert pred.tolist() == [[0, 0]]
