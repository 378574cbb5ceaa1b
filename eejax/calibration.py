"""Threshold search, budget fitting, temperature scaling and calibration error.

Everything here is batched array work on the device: K candidate threshold
settings are scored against score_ExB in one jitted call (in chunks of K to
bound memory), never a loop over thresholds or images. Thresholds are always
fitted on the validation split and then reported on test.

Shapes: E exits, B (or N) images, C classes, K candidate settings, G grid points.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from eejax import policies, thresholds
from eejax.errors import UserError, is_number


@functools.partial(jax.jit, static_argnames=("policy", "chunk"))
def search(score_ExB, pred_ExB, labels_B, cost_E, threshold, policy="max_prob", chunk: int = 256, hits_ExB=None):
  """(accuracy_K, macs_K) of every threshold setting (threshold_K, _KxE or _KxExC) at once.

  hits_ExB, if given, replaces correct = (pred == label) (e.g. agreement with the last exit, `eejax.risk`).

  Walking the exits in order, an image is taken by exit e if it passes there
  and at no earlier exit (the last exit takes everything left):
  accuracy[k] = mean_b sum_e taken[k,e,b] correct[e,b] and
  macs[k] = mean_b sum_e taken[k,e,b] cost[e]. E is small and static, so this
  is one fused element-wise pass over K x B per exit. The K settings are
  processed `chunk` at a time with lax.map, so memory is O(chunk * B).
  """
  passes = policies.get(policy).passes
  threshold = jnp.asarray(threshold, jnp.float32)
  k = threshold.shape[0]
  chunk = min(chunk, k)
  padded = -(-k // chunk) * chunk
  threshold = jnp.concatenate([threshold, jnp.repeat(threshold[-1:], padded - k, axis=0)])
  correct_ExB = (pred_ExB == labels_B[None]).astype(jnp.float32) if hits_ExB is None else hits_ExB.astype(jnp.float32)
  cost_E = jnp.asarray(cost_E, jnp.float32)
  num_exits = score_ExB.shape[0]

  def one_chunk(t):
    t_KxExB = policies.thresholds_KxExB(t, pred_ExB)
    left_KxB = jnp.ones((t.shape[0], score_ExB.shape[1]), jnp.bool_)
    accuracy_KxB = macs_KxB = jnp.zeros(left_KxB.shape, jnp.float32)
    for e in range(num_exits):
      if e == num_exits - 1:
        passes_KxB = left_KxB
      else:
        t_e = t_KxExB[:, min(e, t_KxExB.shape[1] - 1)]
        passes_KxB = passes(score_ExB[e][None], t_e)
      taken_KxB = left_KxB & passes_KxB
      accuracy_KxB = accuracy_KxB + jnp.where(taken_KxB, correct_ExB[e][None], 0.0)
      macs_KxB = macs_KxB + jnp.where(taken_KxB, cost_E[e], 0.0)
      left_KxB = left_KxB & ~passes_KxB
    return accuracy_KxB.mean(-1), macs_KxB.mean(-1)

  if padded == chunk:  # one chunk: no loop (XLA:CPU optimises loop bodies poorly)
    return one_chunk(threshold)
  accuracy, macs = jax.lax.map(one_chunk, threshold.reshape(padded // chunk, chunk, *threshold.shape[1:]))
  return accuracy.reshape(-1)[:k], macs.reshape(-1)[:k]


def _quantile_grid(scores, policy: str, num: int) -> np.ndarray:
  """num quantiles of `scores`, plus a threshold that no score passes."""
  scores = np.asarray(scores).ravel()
  never = scores.max() + 1 if policies.get(policy).higher_passes else scores.min() - 1
  return np.unique(np.concatenate([np.quantile(scores, np.linspace(0, 1, num)), [never]])).astype(np.float32)


def curve_thresholds(score_ExB, policy: str, num: int = 200) -> np.ndarray:
  """Global thresholds for a curve: quantiles of the early exits' scores, plus one that never passes."""
  score = np.asarray(score_ExB)
  if policy == "patience":
    return np.arange(1, score.shape[0] + 1, dtype=np.float32)  # patience E never passes before the last exit
  if score.shape[0] == 1:
    return np.zeros(1, np.float32)
  return _quantile_grid(score[:-1], policy, num)


def pareto_front(macs_K, accuracy_K) -> np.ndarray:
  """mask_K of the settings no other setting beats (cheaper or as cheap, and more accurate)."""
  macs_K, accuracy_K = np.asarray(macs_K), np.asarray(accuracy_K)
  order = np.lexsort((-accuracy_K, macs_K))
  mask = np.zeros(len(macs_K), bool)
  best = -np.inf
  for i in order:
    if accuracy_K[i] > best:
      mask[i], best = True, accuracy_K[i]
  return mask


def per_exit_candidates(score_ExB, policy: str, max_candidates: int = 20000) -> np.ndarray:
  """threshold_KxE: a grid over exits 1..E-1 (quantiles of each exit's scores) plus every global threshold.

  Including the global thresholds means the best per-exit setting on the
  fitting split is never worse than the best global one there.
  """
  score = np.asarray(score_ExB)
  num_exits = score.shape[0]
  globals_K = curve_thresholds(score, policy)
  if num_exits == 1:
    return globals_K[:, None]
  per_exit = max(2, int(max_candidates ** (1 / (num_exits - 1))))
  grids = [np.arange(1, e + 3, dtype=np.float32) if policy == "patience" else _quantile_grid(score[e], policy, per_exit)
           for e in range(num_exits - 1)]
  grid = np.array(list(itertools.product(*grids)), np.float32)
  grid = np.concatenate([grid, np.zeros((len(grid), 1), np.float32)], axis=1)  # the last exit ignores its own
  return np.concatenate([grid, np.repeat(globals_K[:, None], num_exits, axis=1)]).astype(np.float32)


def fit_budget(score_ExB, pred_ExB, labels_B, cost_E, candidates, budget_macs: float, policy: str):
  """(threshold, val_accuracy, val_macs): the candidate with the best accuracy within the budget.

  Ties go to the cheaper setting. If no candidate fits (the budget is below
  the first exit's cost), the cheapest one; the caller can tell from val_macs.
  """
  accuracy_K, macs_K = jax.device_get(search(score_ExB, pred_ExB, labels_B, cost_E, candidates, policy=policy))
  best = pick_budget(accuracy_K, macs_K, budget_macs)
  return np.asarray(candidates)[best], float(accuracy_K[best]), float(macs_K[best])


def pick_budget(accuracy_K, macs_K, budget_macs: float) -> int:
  """The index of the most accurate setting within the budget, ties to the cheaper; the cheapest if none fits."""
  accuracy_K, macs_K = np.asarray(accuracy_K), np.asarray(macs_K)
  fits = macs_K <= budget_macs
  if not fits.any():
    return int(np.argmin(macs_K))
  return int(np.lexsort((macs_K, -np.where(fits, accuracy_K, -np.inf)))[0])


def fit_accuracy(score_ExB, pred_ExB, labels_B, cost_E, candidates, target: float, policy: str):
  """(threshold, val_accuracy, val_macs): the cheapest candidate at least `target` accurate (else the most accurate)."""
  accuracy_K, macs_K = jax.device_get(search(score_ExB, pred_ExB, labels_B, cost_E, candidates, policy=policy))
  ok = accuracy_K >= target - 1e-9
  best = int(np.argmin(np.where(ok, macs_K, np.inf))) if ok.any() else int(np.argmax(accuracy_K))
  return np.asarray(candidates)[best], float(accuracy_K[best]), float(macs_K[best])


def check_goal(budget: float | None = None, target_accuracy: float | None = None) -> None:
  """A budget (a fraction of the full network's MACs) in (0, 1] and a target accuracy in [0, 1], else one line."""
  if budget is not None and not (is_number(budget) and 0 < budget <= 1):
    raise UserError(f"budget={budget!r} must be a fraction of the full network's MACs, above 0 and at most 1")
  if target_accuracy is not None and not (is_number(target_accuracy) and 0 <= target_accuracy <= 1):
    raise UserError(f"target_accuracy={target_accuracy!r} must be a fraction between 0 and 1 (0.7 is 70%)")


def fit_summary(fit_out: dict, full_macs: float, budget: float | None = None,
                target_accuracy: float | None = None) -> str:
  """"A% at M% of the MACs" of `fit`'s setting on validation, and where it misses its goal, what it is instead."""
  summary = f"{100 * fit_out['val_accuracy']:.2f}% at {100 * fit_out['val_macs'] / full_macs:.1f}% of the MACs"
  if budget is not None and fit_out["val_macs"] > budget * full_macs * (1 + 1e-6):
    return f"{summary}; no setting is within the budget of {100 * budget:g}%: this is the cheapest"
  if target_accuracy is not None and fit_out["val_accuracy"] < target_accuracy - 1e-9:
    return f"{summary}; no setting reaches {100 * target_accuracy:g}%: this is the most accurate"
  return summary


def fit(logits_ExNxC, labels_N, cost_E, policy, budget_macs: float | None = None,
        target_accuracy: float | None = None):
  """(threshold_ExC, {"val_accuracy", "val_macs"}): per-exit thresholds fitted on these (validation) logits.

  Exactly one goal: the best accuracy within `budget_macs` mean MACs, or the lowest cost reaching
  `target_accuracy`.
  """
  if (budget_macs is None) == (target_accuracy is None):
    raise UserError("give exactly one of a MACs budget and a target accuracy to fit thresholds for")
  policy = policies.get(policy)
  score_ExN, pred_ExN = policy.scores(jnp.asarray(logits_ExNxC))
  candidates = per_exit_candidates(score_ExN, policy.name)
  cost_E = np.asarray(cost_E, np.float32)
  labels_N = jnp.asarray(labels_N)
  if budget_macs is not None:
    t_E, acc, macs = fit_budget(score_ExN, pred_ExN, labels_N, cost_E, candidates, budget_macs, policy.name)
  else:
    t_E, acc, macs = fit_accuracy(score_ExN, pred_ExN, labels_N, cost_E, candidates, target_accuracy, policy.name)
  num_exits, num_classes = np.shape(logits_ExNxC)[0], np.shape(logits_ExNxC)[-1]
  return thresholds.per_exit(t_E, num_exits, num_classes, policy), {"val_accuracy": acc, "val_macs": macs}


@jax.jit
def fit_temperature(logits_ExNxC, labels_N):
  """temperature_E minimising each exit's negative log-likelihood over a log-spaced grid of 401 values in [0.05, 20]."""
  grid_G = jnp.exp(jnp.linspace(jnp.log(0.05), jnp.log(20.0), 401))

  def nll_E(t):
    logp_ExNxC = jax.nn.log_softmax(logits_ExNxC / t, axis=-1)
    return -jnp.take_along_axis(logp_ExNxC, labels_N[None, :, None], axis=2).mean(axis=(1, 2))

  nll_GxE = jax.lax.map(nll_E, grid_G)
  return grid_G[jnp.argmin(nll_GxE, axis=0)]


@functools.partial(jax.jit, static_argnames=("num_bins",))
def expected_calibration_error(logits_ExNxC, labels_N, num_bins: int = 15):
  """ece_E: sum over equal-width confidence bins of (bin size / N) |accuracy - mean confidence|."""
  conf_ExN, pred_ExN = policies.max_prob(logits_ExNxC)
  correct_ExN = (pred_ExN == labels_N[None]).astype(jnp.float32)
  bin_ExN = jnp.clip(jnp.ceil(conf_ExN * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  onehot_ExNxM = jax.nn.one_hot(bin_ExN, num_bins)
  gap_ExM = jnp.abs(jnp.einsum("enm,en->em", onehot_ExNxM, correct_ExN - conf_ExN))
  return gap_ExM.sum(-1) / logits_ExNxC.shape[1]
