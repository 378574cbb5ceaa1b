"""Losses as small pure array functions with per-example outputs.

Shapes: E exits, B batch, C classes.
"""
import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_ExBxC, labels_B, label_smoothing: float = 0.0):
  """Per-exit, per-example cross-entropy ce_ExB.

  ce[e, b] = -sum_c q[b, c] log softmax(logits[e, b])[c], with the smoothed
  target q = (1 - s) onehot(label) + s / C.
  """
  num_classes = logits_ExBxC.shape[-1]
  targets_BxC = optax.smooth_labels(jax.nn.one_hot(labels_B, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits_ExBxC.astype(jnp.float32), targets_BxC[None])


def joint_loss(logits_ExBxC, labels_B, exit_weights_E, label_smoothing: float = 0.0):
  """Weighted sum over exits of the batch-mean cross-entropy.

  loss = sum_e w[e] * mean_b ce[e, b]. Returns (loss, ce_E).
  """
  ce_E = cross_entropy(logits_ExBxC, labels_B, label_smoothing).mean(axis=1)
  return jnp.dot(jnp.asarray(exit_weights_E, jnp.float32), ce_E), ce_E
