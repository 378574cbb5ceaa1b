"""Threshold search, Pareto front, budget fitting, temperature scaling and ECE against numpy."""
import jax
import jax.numpy as jnp
import numpy as np

from eejax import calibration, policies
from test_policies import np_loop


def fake_run(seed=0, e=3, b=400, c=5):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, b)
  # Deeper exits are more often right and more confident.
  logits = rng.normal(size=(e, b, c)).astype(np.float32)
  for k in range(e):
    logits[k, np.arange(b), labels] += 1.0 + 1.5 * k
  return logits, labels, np.array([20.0, 50.0, 100.0])[:e]


def test_search_matches_loop_for_every_granularity_and_chunking():
  logits, labels, cost = fake_run()
  score, pred = policies.scores(jnp.asarray(logits), "max_prob")
  rng = np.random.default_rng(1)
  for threshold in (rng.random(37), rng.random((37, 3)), rng.random((37, 3, 5))):
    acc, macs = jax.device_get(calibration.search(score, pred, labels, cost, threshold, chunk=8))
    ref_acc, ref_macs, _ = np_loop(np.asarray(score), np.asarray(pred), labels, cost, threshold, True)
    np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)
    np.testing.assert_allclose(macs, ref_macs, rtol=1e-5)


def test_pareto_front_by_hand():
  macs = [1, 2, 2, 3, 4, 5]
  acc = [0.5, 0.6, 0.55, 0.6, 0.7, 0.65]
  assert calibration.pareto_front(macs, acc).tolist() == [True, True, False, False, True, False]


def test_curve_thresholds_span_all_early_to_all_final():
  logits, labels, cost = fake_run()
  for policy in policies.POLICIES:
    score, pred = policies.scores(jnp.asarray(logits), policy)
    t = calibration.curve_thresholds(score, policy, 50)
    _, macs = jax.device_get(calibration.search(score, pred, labels, cost, t,
                                                policy=policy))
    assert macs.max() == cost[-1]  # one threshold sends everyone to the last exit
    if policy != "patience":
      assert macs.min() == cost[0]  # and one lets everyone stop at the first


def test_fit_budget_respects_the_budget_and_beats_global_on_the_fitting_split():
  logits, labels, cost = fake_run(b=600)
  score, pred = policies.scores(jnp.asarray(logits), "max_prob")
  candidates = calibration.per_exit_candidates(score, "max_prob", max_candidates=400)
  assert candidates.shape[1] == 3 and len(candidates) >= 400
  budget = 0.5 * cost[-1]
  best, acc, macs = calibration.fit_budget(score, pred, labels, cost, candidates, budget, "max_prob")
  ref_acc, ref_macs, _ = np_loop(np.asarray(score), np.asarray(pred), labels, cost, best[None], True)
  assert macs <= budget and np.isclose(macs, ref_macs[0]) and np.isclose(acc, ref_acc[0])
  globals_k = calibration.curve_thresholds(score, "max_prob")
  g_acc, g_macs = jax.device_get(calibration.search(score, pred, labels, cost, globals_k))
  assert acc >= g_acc[g_macs <= budget].max()
  # Brute force over the same candidates in numpy: nothing within budget is more accurate.
  all_acc, all_macs, _ = np_loop(np.asarray(score), np.asarray(pred), labels, cost, candidates, True)
  assert np.isclose(acc, all_acc[all_macs <= budget].max())


def test_temperature_scaling_recovers_a_known_temperature():
  rng = np.random.default_rng(0)
  true_logits = rng.normal(size=(1, 20000, 4)) * 2.0
  probs = np.exp(true_logits) / np.exp(true_logits).sum(-1, keepdims=True)
  labels = np.array([rng.choice(4, p=p) for p in probs[0]])
  overconfident = np.concatenate([true_logits * 3.0, true_logits]).astype(np.float32)  # exit 1 needs T=3
  t = np.asarray(calibration.fit_temperature(jnp.asarray(overconfident), jnp.asarray(labels)))
  assert abs(t[0] - 3.0) < 0.15 and abs(t[1] - 1.0) < 0.05
  ece = np.asarray(calibration.expected_calibration_error(jnp.asarray(overconfident), jnp.asarray(labels)))
  ece_scaled = np.asarray(calibration.expected_calibration_error(jnp.asarray(overconfident / t[:, None, None]),
                                                                 jnp.asarray(labels)))
  assert ece[0] > 0.05 and ece_scaled[0] < 0.02


def test_ece_matches_numpy():
  logits, labels, _ = fake_run(e=2, b=500)
  ece = np.asarray(calibration.expected_calibration_error(jnp.asarray(logits), jnp.asarray(labels), num_bins=10))
  for e in range(2):
    z = np.exp(logits[e] - logits[e].max(-1, keepdims=True))
    p = z / z.sum(-1, keepdims=True)
    conf, correct = p.max(-1), p.argmax(-1) == labels
    total = 0.0
    for lo in np.arange(10) / 10:
      in_bin = (conf > lo) & (conf <= lo + 0.1)
      if in_bin.any():
        total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    np.testing.assert_allclose(ece[e], total, rtol=1e-4)
