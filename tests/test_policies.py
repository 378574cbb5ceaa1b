"""Exit policies against an independent plain-numpy loop: decisions, accuracy, cost, ties, fallback."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eejax import policies


def np_scores(logits, policy):
  """Independent numpy scores (E, B) and predictions."""
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  pred = logits.argmax(-1)
  if policy == "max_prob":
    return p.max(-1), pred
  if policy == "entropy":
    return -(p * np.log(p)).sum(-1) / np.log(logits.shape[-1]), pred
  run = np.ones_like(pred)
  for e in range(1, len(pred)):
    run[e] = np.where(pred[e] == pred[e - 1], run[e - 1] + 1, 1)
  return run.astype(np.float64), pred


def np_loop(score, pred, labels, cost, threshold, higher):
  """For each setting and image, walk the exits in order: exit, prediction, then accuracy and mean cost."""
  threshold = np.asarray(threshold)
  acc, macs, exits = [], [], []
  for k in range(threshold.shape[0]):
    hits, spent, row = 0, 0.0, []
    for b in range(score.shape[1]):
      chosen = score.shape[0] - 1
      for e in range(score.shape[0] - 1):
        t = threshold[k] if threshold.ndim == 1 else (threshold[k, e] if threshold.ndim == 2
                                                      else threshold[k, e, pred[e, b]])
        if (score[e, b] >= t) if higher else (score[e, b] <= t):
          chosen = e
          break
      hits += pred[chosen, b] == labels[b]
      spent += cost[chosen]
      row.append(chosen)
    acc.append(hits / score.shape[1])
    macs.append(spent / score.shape[1])
    exits.append(row)
  return np.array(acc), np.array(macs), np.array(exits)


@pytest.mark.parametrize("policy", policies.POLICIES)
@pytest.mark.parametrize("granularity", ["global", "per_exit", "per_class"])
def test_policy_matches_numpy_loop(policy, granularity):
  rng = np.random.default_rng(0)
  e, b, c = 4, 200, 3
  logits = rng.normal(size=(e, b, c)).astype(np.float32) * 2
  logits[:, :20] = logits[:1, :20]  # identical exits: ties in confidence, long agreement runs
  labels = rng.integers(0, c, b)
  cost = np.array([10.0, 25.0, 60.0, 100.0])
  score_ref, pred_ref = np_scores(logits.astype(np.float64), policy)
  score, pred = jax.device_get(policies.scores(jnp.asarray(logits), policy))
  np.testing.assert_allclose(score, score_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(pred, pred_ref)
  # Thresholds drawn from the scores themselves, so many images sit exactly on a threshold.
  picks = rng.choice(score[:-1].ravel(), size=(6, e, c))
  threshold = {"global": picks[:, 0, 0], "per_exit": picks[:, :, 0], "per_class": picks}[granularity]
  if policy == "patience":
    threshold = np.round(threshold)
  higher = policies.get(policy).higher_passes
  exits = np.asarray(policies.first_exit(jnp.asarray(score), jnp.asarray(pred), threshold, policy))
  acc, macs, _ = jax.device_get(policies.outcome(jnp.asarray(exits), jnp.asarray(pred), jnp.asarray(labels), cost))
  ref_acc, ref_macs, ref_exits = np_loop(score, pred, labels, cost, threshold, higher)
  np.testing.assert_array_equal(exits, ref_exits)
  np.testing.assert_allclose(acc, ref_acc, rtol=1e-6)
  np.testing.assert_allclose(macs, ref_macs, rtol=1e-5)


@pytest.mark.parametrize("policy", policies.POLICIES)
def test_decide_is_the_numpy_loop_at_one_setting(policy):
  """`decide` on raw logits: the loop's exit and the class predicted there, per image."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 64, 4)).astype(np.float32) * 2
  score_ref, pred_ref = np_scores(logits.astype(np.float64), policy)
  threshold_ExC = np.quantile(score_ref, 0.5, axis=1)[:, None].repeat(4, 1) if policy != "patience" else \
      np.full((3, 4), 2.0)
  higher = policies.get(policy).higher_passes
  _, _, ref_exits = np_loop(score_ref, pred_ref, np.zeros(64, int), np.ones(3), threshold_ExC[None], higher)
  exit_B, pred_B = jax.device_get(policies.decide(logits, threshold_ExC, policy))
  np.testing.assert_array_equal(exit_B, ref_exits[0])
  np.testing.assert_array_equal(pred_B, pred_ref[ref_exits[0], np.arange(64)])
  assert len(set(exit_B.tolist())) > 1  # the setting splits the images


@pytest.mark.parametrize("policy", policies.POLICIES)
def test_host_exit_score_is_numpy_and_equals_the_reference(policy):
  """The cascade's host test, exit by exit, against the independent scores; no JAX array comes out."""
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 50, 5)).astype(np.float32) * 3
  logits[:, :10] = logits[:1, :10]  # agreeing exits: patience runs longer than 1
  score_ref, pred_ref = np_scores(logits.astype(np.float64), policy)
  p = policies.get(policy)
  run_B, prev_B = np.zeros(50, np.int32), np.full(50, -1)
  jax_run_B = jnp.zeros(50, jnp.int32)
  for e in range(4):
    score_B, pred_B, run_B = p.host_exit_score(logits[e], run_B, prev_B)
    assert all(isinstance(a, np.ndarray) for a in (score_B, pred_B)) and score_B.dtype == np.float32
    np.testing.assert_allclose(score_B, score_ref[e], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pred_B, pred_ref[e])
    jax_score_B, _, jax_run_B = p.exit_score(jnp.asarray(logits[e]), jax_run_B, jnp.asarray(prev_B))
    np.testing.assert_allclose(score_B, np.asarray(jax_score_B), rtol=1e-5, atol=1e-6)  # the in-graph form
    prev_B = pred_B
  assert policy != "patience" or score_B.max() == 4  # the agreeing images ran through all four exits


def test_last_exit_always_answers():
  score = jnp.zeros((3, 5))
  pred = jnp.zeros((3, 5), jnp.int32)
  assert (policies.first_exit(score, pred, jnp.array([1.0]), "max_prob") == 2).all()
  assert (policies.first_exit(score, pred, jnp.array([-1.0]), "entropy") == 2).all()
  assert (policies.first_exit(score, pred, jnp.array([0.0]), "max_prob") == 0).all()  # ties pass


def test_agreement_run_doctest_values():
  np.testing.assert_array_equal(policies.agreement_run(jnp.array([[1, 0], [1, 0], [2, 0]])), [[1, 1], [2, 2], [1, 3]])


@pytest.mark.parametrize("policy", policies.POLICIES)
def test_one_exit_at_a_time_equals_all_exits_at_once(policy):
  """Policy.exit_score (what inference and every export use) walks the exits to the same scores as Policy.scores."""
  p = policies.get(policy)
  logits = np.random.default_rng(1).normal(size=(4, 50, 3)).astype(np.float32)
  logits[:, :10] = logits[:1, :10]  # long agreement runs
  score_ExB, pred_ExB = p.scores(jnp.asarray(logits))
  run_B, prev_B = jnp.zeros(50, jnp.int32), jnp.full(50, -1)
  for e in range(4):
    score_B, pred_B, run_B = p.exit_score(jnp.asarray(logits[e]), run_B, prev_B)
    np.testing.assert_allclose(score_B, score_ExB[e], rtol=1e-6)
    np.testing.assert_array_equal(pred_B, pred_ExB[e])
    prev_B = pred_B
  assert p.passes(jnp.float32(0.5), p.never) == False  # pylint: disable=g-explicit-bool-comparison


def test_an_unknown_policy_is_one_user_error():
  from eejax.errors import UserError  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="unknown policy 'maxprob'; valid: entropy, max_prob, patience"):
    policies.get("maxprob")
