"""Exit policies: small objects that score every exit and say which scores pass.

Shapes: E exits, B images, C classes, K threshold settings evaluated at once.

A `Policy` turns one exit's logits_BxC into a score_B and a prediction pred_B
(`exit_score`, the form both inference paths and the in-graph exports use;
`host_exit_score` is the same in numpy, for the host code between a deployed
cascade's stages, where JAX need not be) or all
exits' logits_ExBxC at once (`scores`, the form the simulation uses); image b
stops at the first exit e whose score passes that exit's threshold
(`passes`), and the last exit always answers:

* max_prob: score = the top softmax probability; passes when score >= t.
* entropy:  score = H(softmax) / log C in [0, 1]; passes when score <= t.
* patience: score = how many consecutive exits up to e agree with exit e's
  prediction (1 at exit 1); passes when score >= t (t = the patience p).

A fitted threshold is a threshold_ExC (`eejax.thresholds`); a search
evaluates K candidate settings at once, each one number (threshold_K), one per
exit (threshold_KxE) or one per exit and predicted class (threshold_KxExC).
The cost of an image is the cumulative MACs of its answering exit
(`eejax.flops.ExitMacs.cumulative`), every head tried on the way included.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from eejax import cascade_runtime
from eejax.errors import unknown_name


def max_prob(logits_ExBxC):
  """(conf_ExB, pred_ExB): the top softmax probability and its class at every exit."""
  probs_ExBxC = jax.nn.softmax(logits_ExBxC.astype(jnp.float32), axis=-1)
  return probs_ExBxC.max(-1), probs_ExBxC.argmax(-1)


def normalized_entropy(logits_ExBxC):
  """(entropy_ExB in [0, 1], pred_ExB): -sum p log p / log C."""
  logp_ExBxC = jax.nn.log_softmax(logits_ExBxC.astype(jnp.float32), axis=-1)
  entropy_ExB = -jnp.sum(jnp.exp(logp_ExBxC) * logp_ExBxC, axis=-1) / jnp.log(logits_ExBxC.shape[-1])
  return entropy_ExB, logp_ExBxC.argmax(-1)


def next_run(run_B, prev_pred_B, pred_B):
  """run_B at the next exit: one more where its prediction repeats the previous exit's, else 1."""
  run_B = jnp.asarray(run_B)  # lax.select, not jnp.where: the latter traces a `reshard` that ONNX export lacks
  return jax.lax.select(jnp.asarray(pred_B == prev_pred_B), run_B + 1, jnp.ones_like(run_B))


def agreement_run(pred_ExB):
  """run_ExB: the number of consecutive exits ending at e that predict pred[e].

  >>> agreement_run(jnp.array([[1], [1], [2], [2], [2]]))[:, 0].tolist()
  [1, 2, 1, 2, 3]
  """
  def step(run_B, pair):
    run_B = next_run(run_B, *pair)
    return run_B, run_B
  first_B = jnp.ones_like(pred_ExB[0])
  _, rest_ExB = jax.lax.scan(step, first_B, (pred_ExB[:-1], pred_ExB[1:]))
  return jnp.concatenate([first_B[None], rest_ExB])


def _patience(logits_ExBxC):
  pred_ExB = jnp.argmax(logits_ExBxC, -1)
  return agreement_run(pred_ExB).astype(jnp.float32), pred_ExB


@dataclasses.dataclass(frozen=True)
class Policy:
  """A score per exit and its pass direction. `never` is the threshold no score passes (+inf or -inf)."""
  name: str
  higher_passes: bool
  all_exits: object  # logits_ExBxC -> (score_ExB float32, pred_ExB)
  uses_run: bool = False  # the score needs the earlier exits' predictions (patience)

  def scores(self, logits_ExBxC):
    """(score_ExB float32, pred_ExB) of every exit at once: one compiled program per policy and shape where the
    logits are concrete (op by op, a dozen small programs, each traced and compiled on its own)."""
    return _scores(self.all_exits, logits_ExBxC)

  def exit_score(self, logits_BxC, run_B, prev_pred_B):
    """(score_B, pred_B, run_B) of one exit, given the agreement run and prediction of the exit before."""
    if self.uses_run:
      pred_B = jnp.argmax(logits_BxC, -1)
      run_B = next_run(run_B, prev_pred_B, pred_B)
      return run_B.astype(jnp.float32), pred_B, run_B
    score_1xB, pred_1xB = self.all_exits(logits_BxC[None])
    return score_1xB[0], pred_1xB[0], run_B

  def host_exit_score(self, logits_BxC, run_B, prev_pred_B):
    """`exit_score` in numpy (float32), as a deployed cascade makes it between stages (`eejax.cascade_runtime`)."""
    return cascade_runtime.exit_score(self.name, logits_BxC, run_B, prev_pred_B)

  def passes(self, score, threshold):
    return cascade_runtime.passes(self.name, score, threshold)

  @property
  def never(self) -> float:
    return float("inf") if self.higher_passes else float("-inf")


@functools.partial(jax.jit, static_argnums=0)
def _scores(all_exits, logits_ExBxC):
  return all_exits(logits_ExBxC)


MAX_PROB = Policy("max_prob", cascade_runtime.HIGHER_PASSES["max_prob"], max_prob)
ENTROPY = Policy("entropy", cascade_runtime.HIGHER_PASSES["entropy"], normalized_entropy)
PATIENCE = Policy("patience", cascade_runtime.HIGHER_PASSES["patience"], _patience, uses_run=True)
POLICIES = {p.name: p for p in (MAX_PROB, ENTROPY, PATIENCE)}


def get(policy) -> Policy:
  """The `Policy` of a name (or the policy itself); an unknown name is a `UserError` listing the valid ones."""
  if isinstance(policy, Policy):
    return policy
  if policy not in POLICIES:
    raise unknown_name("policy", policy, POLICIES)
  return POLICIES[policy]


def scores(logits_ExBxC, policy):
  """(score_ExB float32, pred_ExB) of `policy` (a name or a `Policy`)."""
  return get(policy).scores(logits_ExBxC)


def thresholds_KxExB(threshold, pred_ExB):
  """Broadcasts threshold_K, threshold_KxE or threshold_KxExC to every (setting, exit, image)."""
  threshold = jnp.asarray(threshold, jnp.float32)
  if threshold.ndim == 1:
    return threshold[:, None, None]
  if threshold.ndim == 2:
    return threshold[:, :, None]
  return jnp.take_along_axis(threshold, pred_ExB[None], axis=2)  # KxExC gathered at the predicted class


def first_exit(score_ExB, pred_ExB, threshold, policy="max_prob"):
  """exit_KxB: the first exit whose score passes its threshold; the last exit if none does.

  >>> first_exit(jnp.array([[0.5, 0.9], [0.7, 0.8]]), jnp.zeros((2, 2), int), jnp.array([0.6, 0.95])).tolist()
  [[1, 0], [1, 1]]
  """
  passes_KxExB = get(policy).passes(score_ExB[None], thresholds_KxExB(threshold, pred_ExB))
  passes_KxExB = passes_KxExB.at[:, -1].set(True)
  return jnp.argmax(passes_KxExB, axis=1)


def decide(logits_ExBxC, threshold_ExC, policy="max_prob"):
  """(exit_B, pred_B): where `policy` stops each image at one threshold setting, and the class it answers."""
  score_ExB, pred_ExB = scores(jnp.asarray(logits_ExBxC), policy)
  exit_B = first_exit(score_ExB, pred_ExB, jnp.asarray(threshold_ExC)[None], policy)[0]
  return exit_B, jnp.take_along_axis(pred_ExB, exit_B[None], axis=0)[0]


def outcome(exit_KxB, pred_ExB, labels_B, cost_E):
  """(accuracy_K, macs_K, pred_KxB): mean accuracy and cost of each setting's decisions."""
  pred_KxB = jnp.take_along_axis(pred_ExB[None], exit_KxB[:, None], axis=1)[:, 0]
  cost_KxB = jnp.asarray(cost_E, jnp.float32)[exit_KxB]
  return jnp.mean(pred_KxB == labels_B[None], axis=-1), cost_KxB.mean(-1), pred_KxB
