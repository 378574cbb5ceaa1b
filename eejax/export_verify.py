"""The measurements of `eejax.export`: each format's runner against JAX, and its latency.

A runner is f(x_1xHxWx3 uint8, threshold_ExC) -> (logits_1xC of the exit that answered, its 0-based index),
optionally with `.batch(x_BxHxWx3, threshold_ExC) -> (logits_BxC, exit_B)`. Latency is the mean over the images
of each image's fastest of 3 calls (ms), so a mix of exits is weighted as the policy mixes them.
"""
import time

import jax
import numpy as np

from eejax import policies, thresholds
from eejax.writers import Count


def batch_one(batch, batched: bool = True):
  """The runner of a batch form `batch(x_BxHxWx3, threshold_ExC) -> (logits_BxC, exit_B)`: it answers one image
  as (logits_1xC, exit index); with `batched`, `.batch` is the batch form itself (timed at batch 64)."""
  def runner(x_1xHxWx3, threshold_ExC):
    logits_1xC, exit_1 = batch(x_1xHxWx3, threshold_ExC)
    return logits_1xC, np.int32(exit_1[0])
  if batched:
    runner.batch = batch
  return runner


def counted(runner, count: Count):
  """`runner` ticking `count` once per call (a batch call counts once): progress while a format is measured."""
  def run(x, t):
    return count.tick(runner(x, t))
  if hasattr(runner, "batch"):
    run.batch = lambda x, t: count.tick(runner.batch(x, t))
  return run


def calls(num_exits: int, num_images: int, batched: bool, batch: int = 64) -> int:
  """How many runner calls `verify`, `policy_latency` and (where `batched`) `batch_latency` make."""
  return (num_exits + 1) * (4 * num_images + 1) + (batch + 4 if batched else 0)


def latency_ms(fn, images, rounds: int = 3) -> float:
  """Mean over the images of each image's fastest of `rounds` calls (ms): the best-of is robust to a busy host."""
  best = np.full(len(images), np.inf)
  for _ in range(rounds):
    for i, x in enumerate(images):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(x))
      best[i] = min(best[i], 1e3 * (time.perf_counter() - t0))
  return float(np.mean(best))


def verify(runner, reference_logits_NxExC, images_Nx1xHxWx3, policy="max_prob") -> list[dict]:
  """Per exit k (forced): max |logits - reference| over the images, the share with the reference's top-1 class,
  exit check, latency (ms)."""
  num_exits, num_classes = reference_logits_NxExC.shape[1:]
  rows = []
  for k in range(num_exits):
    t = thresholds.forced(k, num_exits, num_classes, policy)
    runner(images_Nx1xHxWx3[0], t)  # warm-up (compilation, allocation)
    diffs, same_top1, right_exit = [], [], True
    for x, ref in zip(images_Nx1xHxWx3, reference_logits_NxExC):
      logits, exit_index = runner(x, t)
      logits_C = np.asarray(logits).reshape(-1)
      diffs.append(float(np.max(np.abs(logits_C - ref[k]))))
      same_top1.append(int(np.argmax(logits_C)) == int(np.argmax(ref[k])))
      right_exit &= int(np.asarray(exit_index)) == k
    rows.append({"exit": k + 1, "max_abs_diff": max(diffs), "top1_agreement": float(np.mean(same_top1)),
                 "answered_at_forced_exit": bool(right_exit),
                 "latency_ms": latency_ms(lambda x: runner(x, t), images_Nx1xHxWx3)})
  return rows


def batch_latency(runner, images_Nx1xHxWx3, threshold_ExC, batch: int = 64) -> dict:
  """A batch form's time per batch of `batch` images (best of 3) and whether it decides as batch 1 does."""
  x_BxHxWx3 = np.concatenate([images_Nx1xHxWx3[:, 0]] * -(-batch // len(images_Nx1xHxWx3)))[:batch]
  runner.batch(x_BxHxWx3, threshold_ExC)
  best = np.inf
  for _ in range(3):
    t0 = time.perf_counter()
    _, exit_B = runner.batch(x_BxHxWx3, threshold_ExC)
    best = min(best, 1e3 * (time.perf_counter() - t0))
  singles = [int(np.asarray(runner(x[None], threshold_ExC)[1])) for x in x_BxHxWx3]
  return {"batch": batch, "ms_per_batch": float(best), "ms_per_image": float(best / batch),
          "exits_match_batch_1": bool(np.array_equal(exit_B, singles))}


def policy_latency(runner, images_Nx1xHxWx3, threshold_ExC, cost_E, reference_NxExC, policy="max_prob",
                   labels_N=None) -> dict:
  """Mean batch-1 latency at the calibrated thresholds, the exits taken, the mean MACs they predict, the share of
  images answered at JAX's exit with JAX's class and, given labels, the accuracy of the format and of JAX."""
  runner(images_Nx1xHxWx3[0], threshold_ExC)
  answers = [runner(x, threshold_ExC) for x in images_Nx1xHxWx3]
  exits = np.array([int(np.asarray(e)) for _, e in answers])
  classes = np.array([int(np.argmax(np.asarray(logits))) for logits, _ in answers])
  want_exit_N, want_class_N = (np.asarray(a) for a in policies.decide(reference_NxExC.transpose(1, 0, 2),
                                                                      threshold_ExC, policy))
  return {"latency_ms": latency_ms(lambda x: runner(x, threshold_ExC), images_Nx1xHxWx3),
          "exit_share": (np.bincount(exits, minlength=len(cost_E)) / len(exits)).tolist(),
          "predicted_mean_macs": float(np.mean(np.asarray(cost_E)[exits])),
          "agrees_with_jax": float(np.mean((exits == want_exit_N) & (classes == want_class_N))),
          **({} if labels_N is None else {"accuracy": float(np.mean(classes == labels_N)),
                                          "jax_accuracy": float(np.mean(want_class_N == labels_N))})}
