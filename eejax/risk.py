"""Early exit with a guarantee: thresholds certified by Learn then Test (Angelopoulos, Bates et al., 2021).

The user states a risk, a tolerance epsilon and a confidence 1 - delta. With
probability at least 1 - delta over the draw of the calibration images, the
returned thresholds have a risk of at most epsilon on future images from the
same distribution:

* disagreement:  the answering exit predicts another class than the full network (the last exit);
* accuracy_loss: the full network is right and the answering exit is wrong (an upper bound on the
  accuracy lost against the full network).

How: an ordered family of candidate settings, from the most conservative (no
early exit: risk 0) to the most aggressive, fixed before the calibration
images are seen; every candidate's empirical risk in one vectorised search
(`eejax.calibration.search`); a valid p-value for "risk > epsilon" per
candidate, the Hoeffding-Bentkus one, min(exp(-n h(min(r, eps), eps)),
e P(Binomial(n, eps) <= ceil(n r))) with h the Bernoulli relative entropy;
then fixed-sequence testing: walk the family in order and certify while
p <= delta, stopping at the first failure. The cheapest certified candidate
is returned; with none, the conservative end (every image to the last exit).

Families: `global` is one threshold for every exit on a grid that depends on
the policy only (probabilities 1 -> 0, entropies 0 -> 1, patience E -> 1);
`per_exit` splits the calibration images in two halves, fits the per-exit
setting for each of a ladder of MACs budgets on the first half (the family,
ordered from the largest budget down), and certifies on the second half only,
so the family never sees the images it is tested on.

A budget-fitted setting (`calibration.fit`) carries no such guarantee: its
validation risk says nothing about the risk on new images.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from eejax import calibration, policies, thresholds
from eejax.errors import UserError, is_number, unknown_name

RISKS = ("disagreement", "accuracy_loss")
FAMILIES = ("global", "per_exit")


def hits(pred_ExN, labels_N, risk: str):
  """hits_ExN: 1 where answering at exit e does not count as a loss (what `calibration.search` averages)."""
  if risk == "disagreement":
    return pred_ExN == pred_ExN[-1:]
  if risk == "accuracy_loss":
    return ~((pred_ExN[-1:] == labels_N[None]) & (pred_ExN != labels_N[None]))
  raise unknown_name("risk", risk, RISKS)


def hb_p_values(risk_K, n: int, epsilon: float) -> np.ndarray:
  """p_K: Hoeffding-Bentkus p-values of H0: risk > epsilon, given empirical risks over n images."""
  risk_K = np.asarray(risk_K, np.float64)
  a = np.minimum(risk_K, epsilon)
  with np.errstate(divide="ignore", invalid="ignore"):
    h = np.where(a > 0, a * np.log(a / epsilon), 0.0) + np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - epsilon)), 0.0)
  hoeffding = np.exp(-n * h)
  # P(Binomial(n, eps) <= k) for every k at once, from log-pmfs (float64, no SciPy).
  i = np.arange(n + 1)
  lgamma = np.vectorize(math.lgamma)
  log_pmf = lgamma(n + 1) - lgamma(i + 1) - lgamma(n - i + 1) + i * math.log(epsilon) + (n - i) * math.log1p(-epsilon)
  cdf = np.minimum(np.cumsum(np.exp(log_pmf - log_pmf.max())) * np.exp(log_pmf.max()), 1.0)
  k = np.minimum(np.ceil(n * risk_K - 1e-9).astype(int), n)
  return np.minimum(hoeffding, math.e * cdf[k])


def fixed_sequence(p_K, delta: float) -> int:
  """How many leading candidates are certified: the walk stops at the first p > delta."""
  fails = np.flatnonzero(np.asarray(p_K) > delta)
  return int(fails[0]) if fails.size else len(p_K)


def global_family(policy, num_exits: int, num: int = 101) -> np.ndarray:
  """threshold_K, conservative first, fixed by the policy alone."""
  policy = policies.get(policy)
  if policy.uses_run:
    return np.arange(num_exits, 0, -1, dtype=np.float32)
  grid = np.linspace(1.0, 0.0, num, dtype=np.float32)
  return grid if policy.higher_passes else grid[::-1].copy()


def per_exit_family(score_ExN, hits_ExN, cost_E, policy, num: int = 40) -> np.ndarray:
  """threshold_KxE, conservative first: no early exit, then for budgets from the full cost down the per-exit
  setting with the lowest risk within the budget (ties to the cheaper)."""
  policy = policies.get(policy)
  candidates_KxE = calibration.per_exit_candidates(score_ExN, policy.name)
  kept_K, macs_K = (np.asarray(a) for a in jax.device_get(calibration.search(
      score_ExN, np.zeros(score_ExN.shape, np.int32), np.zeros(score_ExN.shape[1], np.int32), cost_E,
      candidates_KxE, policy=policy.name, hits_ExB=hits_ExN)))
  never_E = np.full(candidates_KxE.shape[1], policy.never, np.float32)
  budgets = [b for b in np.linspace(1.0, 0.0, num) * float(np.asarray(cost_E)[-1]) if (macs_K <= b).any()]
  return np.stack([never_E] + [candidates_KxE[calibration.pick_budget(kept_K, macs_K, b)] for b in budgets])


def certify(logits_ExNxC, labels_N, cost_E, epsilon: float, delta: float = 0.1, risk: str = "disagreement",
            policy="max_prob", family: str = "global", seed: int = 0) -> dict:
  """The cheapest setting certified to risk <= epsilon with probability >= 1 - delta (see the module docstring).

  Returns {"threshold_ExC", "certified" (False: none was, every image goes to the last exit), "risk",
  "macs", "p_value", "n", ...} measured on the images it was certified on.
  """
  return certify_each(logits_ExNxC, labels_N, cost_E, (epsilon,), delta, risk, policy, family, seed)[0]


def certify_each(logits_ExNxC, labels_N, cost_E, epsilons, delta: float = 0.1, risk: str = "disagreement",
                 policy="max_prob", family: str = "global", seed: int = 0) -> list[dict]:
  """`certify` for several tolerances: the family is built and scored once, only the tests differ."""
  policy = policies.get(policy)
  if family not in FAMILIES:
    raise unknown_name("risk family", family, FAMILIES)
  if not all(is_number(v) and 0 < v < 1 for v in (delta, *epsilons)):
    shown = [f"{v:g}" if is_number(v) else repr(v) for v in (*epsilons, delta)]
    raise UserError(f"risk tolerances {', '.join(shown[:-1])} and delta {shown[-1]}: each must lie "
                    "strictly between 0 and 1 (fractions: 0.05 is 5%)")
  score_ExN, pred_ExN = jax.device_get(policy.scores(jnp.asarray(logits_ExNxC)))  # sliced and compared on the host
  labels_N = np.asarray(labels_N)
  num_exits, num_classes = np.shape(logits_ExNxC)[0], np.shape(logits_ExNxC)[-1]
  cost_E = np.asarray(cost_E, np.float32)
  test_idx = np.arange(len(labels_N))
  if family == "global":
    family_K = global_family(policy, num_exits)
  else:
    order = np.random.default_rng(seed).permutation(len(labels_N))
    fit_idx, test_idx = np.sort(order[:len(order) // 2]), np.sort(order[len(order) // 2:])
    family_K = per_exit_family(score_ExN[:, fit_idx], hits(pred_ExN[:, fit_idx], labels_N[fit_idx], risk), cost_E,
                               policy)
  score_ExN, pred_ExN, labels_N = score_ExN[:, test_idx], pred_ExN[:, test_idx], labels_N[test_idx]
  kept_K, macs_K = jax.device_get(calibration.search(score_ExN, pred_ExN, labels_N, cost_E, family_K,
                                                     policy=policy.name, hits_ExB=hits(pred_ExN, labels_N, risk)))
  risk_K = 1.0 - np.asarray(kept_K, np.float64)
  n = len(test_idx)
  about = {"n": n, "delta": delta, "risk_name": risk, "policy": policy.name, "family": family,
           "candidates": len(family_K)}
  out = []
  for epsilon in epsilons:
    p_K = hb_p_values(risk_K, n, epsilon)
    certified = fixed_sequence(p_K, delta)
    if certified:
      best = int(np.argmin(np.where(np.arange(len(p_K)) < certified, macs_K, np.inf)))
      t_E = np.broadcast_to(family_K[best], (num_exits,))  # a global threshold serves every exit
      threshold_ExC = thresholds.per_exit(t_E, num_exits, num_classes, policy)
      chosen = {"risk": float(risk_K[best]), "macs": float(macs_K[best]), "p_value": float(p_K[best])}
    else:
      threshold_ExC = np.full((num_exits, num_classes), policy.never, np.float32)
      chosen = {"risk": 0.0, "macs": float(cost_E[-1]), "p_value": None}
    out.append({"threshold_ExC": threshold_ExC, "certified": bool(certified), **chosen, "epsilon": epsilon,
                "candidates_certified": certified, **about})
  return out


def risk_of(threshold_ExC, logits_ExNxC, labels_N, cost_E, risk: str, policy="max_prob") -> tuple[float, float]:
  """(risk, mean MACs) of one setting on a split (e.g. test)."""
  policy = policies.get(policy)
  score_ExN, pred_ExN = jax.device_get(policy.scores(jnp.asarray(logits_ExNxC)))
  labels_N = np.asarray(labels_N)
  kept, macs = jax.device_get(calibration.search(score_ExN, pred_ExN, labels_N, np.asarray(cost_E, np.float32),
                                                np.asarray(threshold_ExC)[None], policy=policy.name,
                                                hits_ExB=hits(pred_ExN, labels_N, risk)))
  return 1.0 - float(kept[0]), float(macs[0])
