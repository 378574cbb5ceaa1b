"""Real early-exit inference: images that exit are not computed any further.

* `BatchedEarlyExit`: runs the network one exit at a time over a batch; after
  each exit the images that have not exited are gathered into a smaller batch,
  padded to one of a few bucket sizes (B, B/2, B/4, ...) so XLA compiles a
  bounded number of shapes (at most exits x buckets), and only they go on.
* `early_exit_fn` / `single_image_fn`: batch size 1, with a `lax.cond` after
  every exit, so the whole decision runs on the device with no host round-trip
  between stages; it can be exported with `jax.export` (`eejax.export`).

Both return, per image, the prediction, the 0-based index of the exit that
answered and its cost (cumulative MACs), identical to `eejax.policies`'s
simulation with the same thresholds. Thresholds: threshold_E (per exit) or
threshold_ExC (per exit and predicted class); the last exit always answers.
"""
import jax
import jax.numpy as jnp
import numpy as np

from eejax import input_pipeline, policies


def _exit_score(logits_BxC, policy: str, run_B, prev_pred_B):
  """(score_B, pred_B, run_B) of one exit; run_B counts agreeing consecutive exits (patience)."""
  pred_B = jnp.argmax(logits_BxC, -1)
  if policy == "patience":  # only patience reads the run; other policies pass it through untouched
    run_B = jnp.where(pred_B == prev_pred_B, run_B + 1, 1)
    return run_B.astype(jnp.float32), pred_B, run_B
  score_1xB, _ = policies.scores(logits_BxC[None], policy)
  return score_1xB[0], pred_B, run_B


def _threshold_at(threshold, k, pred_B):
  threshold = jnp.asarray(threshold, jnp.float32)
  return threshold[k] if threshold.ndim == 1 else threshold[k][pred_B]


def bucket_sizes(batch_size: int, smallest: int = 8) -> list[int]:
  """[B, B/2, B/4, ...] down to `smallest` (B itself if smaller)."""
  sizes = [batch_size]
  while sizes[-1] // 2 >= smallest and sizes[-1] % 2 == 0:
    sizes.append(sizes[-1] // 2)
  return sizes


class BatchedEarlyExit:
  """Stage-by-stage inference over batches of uint8 images; see the module docstring."""

  def __init__(self, model, variables, mean_C, std_C, cost_E, batch_size: int, smallest_bucket: int = 8):
    self.num_exits = model.num_exits
    self.cost_E = np.asarray(cost_E, np.float64)
    self.buckets = bucket_sizes(batch_size, smallest_bucket)
    apply = lambda method, *a: model.apply(variables, *a, method=method)
    self._stem = jax.jit(lambda x: apply(lambda m, x: m.stem(input_pipeline.normalize(x, mean_C, std_C)), x))
    self._segments = [jax.jit(lambda h, k=k: apply(lambda m, h: m.segment(k, h), h)) for k in range(self.num_exits)]
    self._decide = jax.jit(_exit_score, static_argnums=1)
    self._gather = jax.jit(lambda h, idx: h[idx])
    self._full = jax.jit(lambda x: model.apply(variables, input_pipeline.normalize(x, mean_C, std_C))[0])

  def __call__(self, x_BxHxWx3, threshold, policy: str = "max_prob"):
    """(pred_B, exit_B, cost_B) as numpy arrays; B may be at most the largest bucket."""
    b = x_BxHxWx3.shape[0]
    higher = policies.HIGHER_PASSES[policy]
    pred_B, exit_B = np.zeros(b, np.int64), np.full(b, self.num_exits - 1)
    h = self._stem(self._pad(x_BxHxWx3, self._bucket(b)))
    active = np.arange(b)  # original index of the first len(active) rows of h
    run = jnp.zeros(h.shape[0], jnp.int32)
    prev = jnp.full(h.shape[0], -1)
    for k in range(self.num_exits):
      h, logits = self._segments[k](h)
      score, pred, run = self._decide(logits, policy, run, prev)
      prev = pred
      n = len(active)
      score, pred_np = np.asarray(score)[:n], np.asarray(pred)[:n]
      t = np.broadcast_to(np.asarray(_threshold_at(threshold, k, pred)), pred.shape)[:n]
      done = np.ones(n, bool) if k == self.num_exits - 1 else (score >= t if higher else score <= t)
      pred_B[active[done]], exit_B[active[done]] = pred_np[done], k
      stay = np.flatnonzero(~done)
      if stay.size == 0:
        break
      idx = self._pad(stay, self._bucket(stay.size))
      h, run, prev = self._gather(h, idx), self._gather(run, idx), self._gather(prev, idx)
      active = active[stay]
    return pred_B, exit_B, self.cost_E[exit_B]

  def full(self, x_BxHxWx3):
    """logits_ExBxC of the whole network (every exit, no skipping), for comparison."""
    return self._full(x_BxHxWx3)

  def _bucket(self, n: int) -> int:
    fitting = [s for s in self.buckets if s >= n]
    if not fitting:
      raise ValueError(f"batch of {n} is larger than the largest bucket {self.buckets[0]}")
    return min(fitting)

  @staticmethod
  def _pad(x, size: int):
    if x.shape[0] == size:
      return x
    return np.concatenate([x, np.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)])


def early_exit_fn(model, variables, mean_C, std_C, policy: str = "max_prob"):
  """f(x_1xHxWx3 uint8, threshold_E or _ExC) -> (logits_1xC of the exit that answered, its 0-based index).

  A `lax.cond` after every exit but the last, so the decisions run inside the
  graph; the threshold is an input (jit- and export-ready, see eejax.export).
  """
  num_exits = model.num_exits
  higher = policies.HIGHER_PASSES[policy]

  def from_exit(k, h, run, prev, threshold):
    h, logits_1xC = model.apply(variables, h, method=lambda m, h: m.segment(k, h))
    if k == num_exits - 1:
      return logits_1xC, jnp.int32(k)
    score, pred, run = _exit_score(logits_1xC, policy, run, prev)
    t = _threshold_at(threshold, k, pred[0])
    passes = score[0] >= t if higher else score[0] <= t
    return jax.lax.cond(passes, lambda: (logits_1xC, jnp.int32(k)),
                        lambda: from_exit(k + 1, h, run, pred, threshold))

  def run(x_1xHxWx3, threshold):
    h = model.apply(variables, input_pipeline.normalize(x_1xHxWx3, mean_C, std_C), method=lambda m, x: m.stem(x))
    return from_exit(0, h, jnp.zeros(1, jnp.int32), jnp.full(1, -1), threshold)

  return run


def single_image_fn(model, variables, mean_C, std_C, cost_E, threshold, policy: str = "max_prob"):
  """f(x_1xHxWx3 uint8) -> (pred, exit, cost): `early_exit_fn` with the thresholds fixed."""
  cascade = early_exit_fn(model, variables, mean_C, std_C, policy)
  cost_E = jnp.asarray(cost_E, jnp.float32)

  def run(x_1xHxWx3):
    logits_1xC, k = cascade(x_1xHxWx3, jnp.asarray(threshold, jnp.float32))
    return jnp.argmax(logits_1xC[0]).astype(jnp.int32), k, cost_E[k]

  return run


def export_single_image(fn, image_shape):
  """jax.export of `single_image_fn` for uint8 inputs of shape (1, *image_shape)."""
  return jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8))
