"""Class Precision Margin (CPM): per-branch, per-class thresholds for BTS-EE, fitted on validation.

Two rules, each branch calibrated on the validation images that earlier branches left:

* absolute (`cpm_thresholds`, eejax's first reading): the lowest candidate threshold (a grid) with at
  least one passing image and precision >= the reference's precision - margin.
* paper (`cpm_paper_thresholds`, our reconstruction of the CalexNet papers' rule from a third-party port):
  the margin is relative, bar = (1 - margin) x the reference's precision on the class; a threshold counts
  only where at least `min_support` validation images of that predicted class pass it; the threshold is
  the confidence at the largest prefix of the confidence-sorted predictions whose running precision
  clears the bar (exact confidences, no grid).

The reference is the backbone's final classifier on the same reaching images (precision 1 for a class it
never predicts there). A class with no valid threshold gets +inf: the branch never answers it.

Shapes: E branches (exits), N images, C classes, K candidate thresholds.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from eejax import policies

RULES = ("paper", "absolute")


def reference_precision_C(reach_N, labels_N, ref_pred_N, num_classes: int) -> np.ndarray:
  """The final classifier's precision per class over the reaching images; 1 where it never predicts the class."""
  reach_N, labels_N, ref_pred_N = (np.asarray(a) for a in (reach_N, labels_N, ref_pred_N))
  count_C = np.bincount(ref_pred_N[reach_N], minlength=num_classes)
  right_C = np.bincount(ref_pred_N[reach_N & (ref_pred_N == labels_N)], minlength=num_classes)
  return np.where(count_C > 0, right_C / np.maximum(count_C, 1), 1.0)


def cpm_paper_thresholds(conf_N, pred_N, reach_N, labels_N, ref_pred_N, margin: float, num_classes: int,
                         min_support: int = 30) -> np.ndarray:
  """threshold_C of one branch by the paper's rule (module docstring); ties in confidence pass together."""
  conf_N, pred_N, labels_N = np.asarray(conf_N), np.asarray(pred_N), np.asarray(labels_N)
  reach_N = np.asarray(reach_N, bool)
  bar_C = (1.0 - margin) * reference_precision_C(reach_N, labels_N, ref_pred_N, num_classes)
  threshold_C = np.full(num_classes, np.inf, np.float32)
  for c in range(num_classes):
    idx = np.flatnonzero(reach_N & (pred_N == c))
    if idx.size < max(min_support, 1):
      continue
    order = idx[np.argsort(-conf_N[idx], kind="stable")]
    conf_k = conf_N[order]
    precision_k = np.cumsum(pred_N[order] == labels_N[order]) / np.arange(1, order.size + 1)
    k = np.arange(1, order.size + 1)
    boundary_k = np.append(conf_k[:-1] > conf_k[1:], True)  # a prefix that ends between two distinct confidences
    valid_k = boundary_k & (k >= min_support) & (precision_k >= bar_C[c] - 1e-9)
    if valid_k.any():
      threshold_C[c] = conf_k[np.flatnonzero(valid_k)[-1]]
  return threshold_C


@functools.partial(jax.jit, static_argnames=("num_classes",))
def cpm_thresholds(conf_ExN, pred_ExN, reach_ExN, labels_N, ref_pred_N, candidates_K, margin, num_classes: int):
  """Class Precision Margin: threshold_ExC, per branch and predicted class, fitted on validation.

  Among the images that reach branch e (reach_ExN), those the branch predicts
  as class c with confidence >= t have precision
  prec[e,c,t] = #correct / #passing. The reference precision ref[e,c] is the
  final classifier's (ref_pred_N) on class c over the same images (1 when it
  never predicts c there). threshold[e,c] is the lowest candidate t (candidates_K
  ascending) with at least one passing image and prec >= ref - margin (to 1e-6);
  a class with no such candidate gets +inf: the branch never answers it.

  All (E, C, K) at once: two einsums of the E x N x C class masks with the
  E x N x K pass masks; memory O(E N (C + K)).
  """
  reach_ExN = reach_ExN.astype(jnp.float32)
  pred_ExNxC = jax.nn.one_hot(pred_ExN, num_classes) * reach_ExN[..., None]
  correct_ExN = (pred_ExN == labels_N[None]).astype(jnp.float32)
  passes_ExNxK = (conf_ExN[..., None] >= candidates_K).astype(jnp.float32)
  passing_ExCxK = jnp.einsum("enc,enk->eck", pred_ExNxC, passes_ExNxK)
  right_ExCxK = jnp.einsum("enc,enk->eck", pred_ExNxC * correct_ExN[..., None], passes_ExNxK)
  ref_NxC = jax.nn.one_hot(ref_pred_N, num_classes)
  ref_count_ExC = reach_ExN @ ref_NxC
  ref_right_ExC = reach_ExN @ (ref_NxC * (ref_pred_N == labels_N)[:, None])
  ref_ExC = jnp.where(ref_count_ExC > 0, ref_right_ExC / jnp.maximum(ref_count_ExC, 1), 1.0)
  precision_ExCxK = right_ExCxK / jnp.maximum(passing_ExCxK, 1)
  valid_ExCxK = (passing_ExCxK > 0) & (precision_ExCxK >= ref_ExC[..., None] - margin - 1e-6)
  first_ExC = jnp.argmax(valid_ExCxK, axis=-1)
  return jnp.where(valid_ExCxK.any(-1), jnp.asarray(candidates_K, jnp.float32)[first_ExC], jnp.inf)


def cpm_exits(conf_N, pred_N, threshold_C):
  """exits_N: the images a branch answers under per-class thresholds (conf >= threshold[pred])."""
  return conf_N >= jnp.asarray(threshold_C)[pred_N]


def cpm_branch(conf_N, pred_N, reach_N, labels_N, ref_pred_N, candidates_K, margin, num_classes: int,
               rule: str = "absolute", min_support: int = 30):
  """(threshold_C, answered_N) of one branch: CPM on the images reaching it, and which of those it answers.

  rule: "absolute" (`cpm_thresholds`: precision >= reference - margin on candidates_K) or "paper"
  (`cpm_paper_thresholds`: relative margin, a support floor, the exact confidences).
  """
  if rule == "paper":
    threshold_C = jnp.asarray(cpm_paper_thresholds(conf_N, pred_N, reach_N, labels_N, ref_pred_N, margin, num_classes,
                                                   min_support))
  else:
    threshold_C = cpm_thresholds(conf_N[None], pred_N[None], jnp.asarray(reach_N)[None], labels_N, ref_pred_N,
                                 candidates_K, margin, num_classes=num_classes)[0]
  return threshold_C, cpm_exits(conf_N, pred_N, threshold_C) & jnp.asarray(reach_N)


def fit_cpm(logits_ExNxC, labels_N, candidates_K, margin: float, rule: str = "absolute", min_support: int = 30):
  """threshold_BxC for the B = E - 1 branches of logits_ExNxC (the last exit is the reference).

  Branch by branch: branch b is calibrated on the validation images that
  branches 1..b-1 (with their fitted thresholds) did not answer.
  """
  conf_ExN, pred_ExN = policies.max_prob(jnp.asarray(logits_ExNxC))
  reach_N = jnp.ones(conf_ExN.shape[1], jnp.bool_)
  thresholds = []
  for b in range(conf_ExN.shape[0] - 1):
    threshold_C, answered_N = cpm_branch(conf_ExN[b], pred_ExN[b], reach_N, labels_N, pred_ExN[-1], candidates_K,
                                         margin, logits_ExNxC.shape[-1], rule, min_support)
    thresholds.append(threshold_C)
    reach_N = reach_N & ~answered_N
  return jnp.stack(thresholds) if thresholds else jnp.zeros((0, logits_ExNxC.shape[-1]))
