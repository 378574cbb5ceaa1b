"""Exit policies: pure array functions that pick, per image, the exit that answers.

Shapes: E exits, B images, C classes, K threshold settings evaluated at once.

A policy turns logits_ExBxC into a score_ExB and the prediction pred_ExB of
every exit; image b stops at the first exit e whose score passes that exit's
threshold, and the last exit always answers:

* max_prob: score = the top softmax probability; passes when score >= t.
* entropy:  score = H(softmax) / log C in [0, 1]; passes when score <= t.
* patience: score = how many consecutive exits up to e agree with exit e's
  prediction (1 at exit 1); passes when score >= t (t = the patience p).

A threshold setting is one number (global, threshold_K), one per exit
(threshold_KxE) or one per exit and predicted class (threshold_KxExC). The
cost of an image is the cumulative MACs of its answering exit
(`eejax.flops.ExitMacs.cumulative`), every head tried on the way included.
"""
import jax
import jax.numpy as jnp

POLICIES = ("max_prob", "entropy", "patience")
HIGHER_PASSES = {"max_prob": True, "entropy": False, "patience": True}


def max_prob(logits_ExBxC):
  """(conf_ExB, pred_ExB): the top softmax probability and its class at every exit."""
  probs_ExBxC = jax.nn.softmax(logits_ExBxC.astype(jnp.float32), axis=-1)
  return probs_ExBxC.max(-1), probs_ExBxC.argmax(-1)


def normalized_entropy(logits_ExBxC):
  """(entropy_ExB in [0, 1], pred_ExB): -sum p log p / log C."""
  logp_ExBxC = jax.nn.log_softmax(logits_ExBxC.astype(jnp.float32), axis=-1)
  entropy_ExB = -jnp.sum(jnp.exp(logp_ExBxC) * logp_ExBxC, axis=-1) / jnp.log(logits_ExBxC.shape[-1])
  return entropy_ExB, logp_ExBxC.argmax(-1)


def agreement_run(pred_ExB):
  """run_ExB: the number of consecutive exits ending at e that predict pred[e].

  >>> agreement_run(jnp.array([[1], [1], [2], [2], [2]]))[:, 0].tolist()
  [1, 2, 1, 2, 3]
  """
  def step(run_B, pair):
    prev_B, cur_B = pair
    run_B = jnp.where(cur_B == prev_B, run_B + 1, 1)
    return run_B, run_B
  first_B = jnp.ones_like(pred_ExB[0])
  _, rest_ExB = jax.lax.scan(step, first_B, (pred_ExB[:-1], pred_ExB[1:]))
  return jnp.concatenate([first_B[None], rest_ExB])


def scores(logits_ExBxC, policy: str):
  """(score_ExB float32, pred_ExB) of `policy`; see the module docstring."""
  if policy == "max_prob":
    return max_prob(logits_ExBxC)
  if policy == "entropy":
    return normalized_entropy(logits_ExBxC)
  if policy == "patience":
    pred_ExB = jnp.argmax(logits_ExBxC, -1)
    return agreement_run(pred_ExB).astype(jnp.float32), pred_ExB
  raise ValueError(f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")


def thresholds_KxExB(threshold, pred_ExB):
  """Broadcasts threshold_K, threshold_KxE or threshold_KxExC to every (setting, exit, image)."""
  threshold = jnp.asarray(threshold, jnp.float32)
  if threshold.ndim == 1:
    return threshold[:, None, None]
  if threshold.ndim == 2:
    return threshold[:, :, None]
  return jnp.take_along_axis(threshold, pred_ExB[None], axis=2)  # KxExC gathered at the predicted class


def first_exit(score_ExB, pred_ExB, threshold, higher_passes: bool = True):
  """exit_KxB: the first exit whose score passes its threshold; the last exit if none does.

  >>> first_exit(jnp.array([[0.5, 0.9], [0.7, 0.8]]), jnp.zeros((2, 2), int), jnp.array([0.6, 0.95])).tolist()
  [[1, 0], [1, 1]]
  """
  t_KxExB = thresholds_KxExB(threshold, pred_ExB)
  passes_KxExB = score_ExB[None] >= t_KxExB if higher_passes else score_ExB[None] <= t_KxExB
  passes_KxExB = passes_KxExB.at[:, -1].set(True)
  return jnp.argmax(passes_KxExB, axis=1)


def outcome(exit_KxB, pred_ExB, labels_B, cost_E):
  """(accuracy_K, macs_K, pred_KxB): mean accuracy and cost of each setting's decisions."""
  pred_KxB = jnp.take_along_axis(pred_ExB[None], exit_KxB[:, None], axis=1)[:, 0]
  cost_KxB = jnp.asarray(cost_E, jnp.float32)[exit_KxB]
  return jnp.mean(pred_KxB == labels_B[None], axis=-1), cost_KxB.mean(-1), pred_KxB

