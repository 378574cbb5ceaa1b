"""MATE and BYOT losses against numpy; gradient flow into the teacher weights; a training run."""
import jax
import jax.numpy as jnp
import numpy as np

from eejax import losses


def softmax(z, axis=-1):
  z = np.exp(z - z.max(axis, keepdims=True))
  return z / z.sum(axis, keepdims=True)


def np_mate(logits, labels, a, w, t, lam, kd_weight):
  e, b, c = logits.shape
  weights = softmax(a)  # JxE
  teachers = np.einsum("je,ebc->jbc", weights, logits)
  probs = softmax(teachers / t)
  target = np.zeros_like(probs)
  for i in range(e):
    for j in range(e):
      target[i] += (lam if i == j else (1 - lam) / (e - 1)) * probs[j]
  logq = np.log(softmax(logits / t))
  kd = t**2 * (target * (np.log(target) - logq)).sum(-1)
  ce = -np.log(softmax(logits))[np.arange(e)[:, None], np.arange(b)[None], labels[None]]
  teacher_ce = -np.log(softmax(teachers))[np.arange(e)[:, None], np.arange(b)[None], labels[None]]
  return (w * (ce.mean(1) + kd_weight * kd.mean(1))).sum() + teacher_ce.mean(1).sum()


def test_mate_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 8, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 8)
  a = rng.normal(size=(3, 3)).astype(np.float32)
  loss, metrics = losses.mate_loss(logits, labels, a, (1.0, 0.5, 2.0), temperature=2.0, primary_weight=0.6,
                                   kd_weight=0.8)
  ref = np_mate(logits.astype(np.float64), labels, a.astype(np.float64), np.array([1.0, 0.5, 2.0]), 2.0, 0.6, 0.8)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert metrics["teacher_ce_E"].shape == (3,)


def test_teacher_weights_get_gradients_but_not_from_the_kl_terms():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 8, 5)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 5, 8))
  a = jnp.asarray(rng.normal(size=(3, 3)).astype(np.float32))
  total = jax.grad(lambda a: losses.mate_loss(logits, labels, a, (1.0,) * 3)[0])(a)
  kl_only = jax.grad(lambda a: losses.mate_loss(logits, labels, a, (1.0,) * 3)[1]["kd_E"].sum())(a)
  teacher_only = jax.grad(lambda a: losses.mate_loss(logits, labels, a, (1.0,) * 3)[1]["teacher_ce_E"].sum())(a)
  assert np.abs(np.asarray(total)).min() > 0  # every teacher weight trains
  np.testing.assert_array_equal(kl_only, np.zeros((3, 3)))  # no KL gradient reaches the teachers
  np.testing.assert_allclose(total, teacher_only, rtol=1e-5, atol=1e-7)
  # The exits' KL does not reach the exits through the teachers either: with the targets frozen,
  # d KL / d logits equals the gradient against a constant target computed outside.
  t = 3.0
  target = jax.lax.stop_gradient(losses.mate_targets(losses.ensemble_teachers(logits, a), t, 0.7))
  direct = jax.grad(lambda z: losses.kl_to_target(z, target, t).mean(1).sum())(logits)
  via_loss = jax.grad(lambda z: losses.mate_loss(z, labels, a, (1.0,) * 3, temperature=t)[1]["kd_E"].sum())(logits)
  np.testing.assert_allclose(via_loss, direct, rtol=1e-5, atol=1e-6)


def test_mate_targets_primary_weight():
  teachers = jnp.array([[[10.0, 0.0]], [[0.0, 10.0]], [[0.0, 10.0]]])
  target = np.asarray(losses.mate_targets(teachers, 1.0, 0.8))
  np.testing.assert_allclose(target[0, 0], 0.8 * softmax(np.array([10.0, 0])) + 0.2 * softmax(np.array([0, 10.0])),
                             rtol=1e-5)
  np.testing.assert_allclose(target.sum(-1), 1.0, rtol=1e-6)


def test_byot_matches_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 6)
  t = 2.5
  loss, metrics = losses.byot_loss(logits, labels, (1.0, 1.0, 1.0), temperature=t, kd_weight=0.5)
  p = softmax(logits[-1] / t)
  kd = np.array([(t**2 * (p * (np.log(p) - np.log(softmax(logits[i] / t)))).sum(-1)).mean() for i in range(2)] + [0])
  ce = np.array([-np.log(softmax(logits[i]))[np.arange(6), labels].mean() for i in range(3)])
  np.testing.assert_allclose(metrics["kd_E"], kd, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, (ce + 0.5 * kd).sum(), rtol=1e-5)
  g = jax.grad(lambda z: losses.byot_loss(z, labels, (1.0,) * 3)[1]["kd_E"].sum())(jnp.asarray(logits))
  np.testing.assert_array_equal(np.asarray(g)[-1], 0)  # the deepest exit is not pulled towards the shallow ones


def test_mate_training_learns_teacher_weights(tiny_tree, tmp_path):
  from test_train import smoke_config  # pylint: disable=g-import-not-at-top
  from eejax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "mate")
  result = train.train_and_evaluate(smoke_config(tiny_tree, str(tmp_path / "c"), scheme="mate"), workdir)
  assert result["method"] == "mate"
  weights = np.asarray(result["ensemble_weights"])
  assert weights.shape == (3, 3)
  np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
  init = np.asarray(jax.nn.softmax(2.0 * jnp.eye(3), axis=-1))
  assert not np.allclose(weights, init, atol=1e-4)  # they trained
