"""Exit policies: pure array functions that pick, per image, the exit that answers.

Shapes: E exits, B images, C classes, K threshold settings. The last exit always
answers. The cost of an image is the cumulative MACs of its answering exit
(`eejax.flops.ExitMacs.cumulative`), every head tried on the way included.
"""
import jax
import jax.numpy as jnp


def max_prob(logits_ExBxC):
  """(conf_ExB, pred_ExB): the top softmax probability and its class at every exit."""
  probs_ExBxC = jax.nn.softmax(logits_ExBxC.astype(jnp.float32), axis=-1)
  return probs_ExBxC.max(-1), probs_ExBxC.argmax(-1)


def first_exit(conf_ExB, threshold_K):
  """exit_KxB: the first exit e with conf[e, b] >= threshold[k]; the last exit if none.

  >>> first_exit(jnp.array([[0.5, 0.9], [0.7, 0.8]]), jnp.array([0.6, 0.95])).tolist()
  [[1, 0], [1, 1]]
  """
  passes_KxExB = conf_ExB[None] >= threshold_K[:, None, None]
  passes_KxExB = passes_KxExB.at[:, -1].set(True)
  return jnp.argmax(passes_KxExB, axis=1)


@jax.jit
def sweep(conf_ExB, correct_ExB, cost_E, threshold_K):
  """(accuracy_K, macs_K): mean accuracy and mean cost of each threshold, all at once."""
  exit_KxB = first_exit(conf_ExB, threshold_K)
  correct_KxB = jnp.take_along_axis(correct_ExB[None], exit_KxB[:, None], axis=1)[:, 0]
  return correct_KxB.mean(-1), jnp.asarray(cost_E, jnp.float32)[exit_KxB].mean(-1)
