"""Losses against a numpy reference."""
import numpy as np

from eejax import losses


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_with_label_smoothing_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 5)
  for s in (0.0, 0.1):
    target = np.full((5, 4), s / 4)
    target[np.arange(5), labels] += 1 - s
    ref = -(target[None] * log_softmax(logits)).sum(-1)
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, s), ref, rtol=1e-5)


def test_joint_loss_is_the_weighted_sum_of_exit_means():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 6)
  ce = -log_softmax(logits)[:, np.arange(6), labels].mean(-1)
  loss, ce_e = losses.joint_loss(logits, labels, (0.5, 1.0, 2.0))
  np.testing.assert_allclose(ce_e, ce, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.5 * ce[0] + ce[1] + 2 * ce[2], rtol=1e-5)
