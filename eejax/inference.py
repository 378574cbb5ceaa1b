"""Real early-exit inference: images that exit are not computed any further.

* `BatchedEarlyExit`: runs the network one exit at a time over a set of
  images in chunks of B; after each exit the images that have not exited are
  gathered on the device into dense chunks of B again (the last padded to one
  of a few bucket sizes B, B/2, B/4, ...), so later stages compute only about
  the images still in play, with one device-to-host copy per stage.
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
  score_B, pred_B = _device_decision(logits_BxC, policy)
  if policy == "patience":  # only patience reads the run; other policies pass it through untouched
    run_B = jnp.where(pred_B == prev_pred_B, run_B + 1, 1)
    score_B = run_B.astype(jnp.float32)
  return score_B, pred_B, run_B


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
  """Stage-by-stage inference over a set of uint8 images; see the module docstring.

  The set is taken `window_chunks * batch_size` images at a time (so the
  activations kept between stages stay bounded) and cut into chunks of
  `batch_size` (the last padded to a bucket).
  After each exit, one device-to-host copy brings back that exit's predictions
  (and scores) for every chunk; the images still in play are then gathered on
  the device into dense chunks again, so the next stage computes
  ceil(remaining / batch_size) chunks rather than every original batch half
  empty. Shapes compiled: one chunk size per stage plus the tail buckets.
  """

  def __init__(self, model, variables, mean_C, std_C, cost_E, batch_size: int, smallest_bucket: int = 8,
               window_chunks: int = 8):
    self.num_exits = model.num_exits
    self.window = window_chunks * batch_size  # images in flight at once: bounds the activations kept
    self.cost_E = np.asarray(cost_E, np.float64)
    self.batch_size = batch_size
    self.buckets = bucket_sizes(batch_size, smallest_bucket)
    apply = lambda method, *a: model.apply(variables, *a, method=method)
    self._stem = jax.jit(lambda x: apply(lambda m, x: m.stem(input_pipeline.normalize(x, mean_C, std_C)), x))
    self._segments = [jax.jit(lambda h, k=k: apply(lambda m, h: m.segment(k, h), h)) for k in range(self.num_exits)]
    self._decide = jax.jit(_device_decision, static_argnums=1)
    self._concat = jax.jit(jnp.concatenate)
    self._gather = jax.jit(lambda h, idx: h[idx])
    self._full = jax.jit(lambda x: model.apply(variables, input_pipeline.normalize(x, mean_C, std_C))[0])

  def __call__(self, x_NxHxWx3, threshold, policy: str = "max_prob"):
    """(pred_N, exit_N, cost_N) as numpy arrays, for any number N of images (a window at a time)."""
    outs = [self._window(x_NxHxWx3[i:i + self.window], threshold, policy)
            for i in range(0, x_NxHxWx3.shape[0], self.window)]
    return tuple(np.concatenate(parts) for parts in zip(*outs))

  def _window(self, x_NxHxWx3, threshold, policy):
    n = x_NxHxWx3.shape[0]
    higher = policies.HIGHER_PASSES[policy]
    threshold = np.asarray(threshold, np.float32)
    pred_N, exit_N = np.zeros(n, np.int64), np.full(n, self.num_exits - 1)
    chunks = self._chunks(n)
    h_list = [self._stem(self._pad(x_NxHxWx3[s:s + m], size)) for s, m, size in chunks]
    active = np.arange(n)  # original index of each image still in play, in chunk order
    run, prev = np.zeros(n, np.int64), np.full(n, -1)
    for k in range(self.num_exits):
      outs = [self._segments[k](h) for h in h_list]
      decisions = jax.device_get([self._decide(logits, policy) for _, logits in outs])  # the stage's one sync
      score = np.concatenate([d[0][:m] for d, (_, m, _) in zip(decisions, chunks)])
      pred = np.concatenate([d[1][:m] for d, (_, m, _) in zip(decisions, chunks)])
      if policy == "patience":
        run = np.where(pred == prev, run + 1, 1)
        score = run.astype(np.float32)
      t = threshold[k] if threshold.ndim == 1 else threshold[k][pred]
      done = np.ones(len(active), bool) if k == self.num_exits - 1 else (score >= t if higher else score <= t)
      pred_N[active[done]], exit_N[active[done]] = pred[done], k
      stay = np.flatnonzero(~done)
      if stay.size == 0:
        break
      # Row r of the concatenated chunks is image active[r]; padding rows sit at the end of each chunk.
      offsets = np.cumsum([0] + [size for _, _, size in chunks[:-1]])
      rows = np.concatenate([o + np.arange(m) for o, (_, m, _) in zip(offsets, chunks)])[stay]
      chunks = self._chunks(stay.size)
      h_all = self._concat([h for h, _ in outs])
      h_list = [self._gather(h_all, self._pad(rows[s:s + m], size)) for s, m, size in chunks]
      active, run, prev = active[stay], run[stay], pred[stay]
    return pred_N, exit_N, self.cost_E[exit_N]

  def full(self, x_BxHxWx3):
    """logits_ExBxC of the whole network (every exit, no skipping), for comparison."""
    return self._full(x_BxHxWx3)

  def _chunks(self, n: int):
    """[(start, images, padded size)]: full chunks of batch_size, then the rest padded to a bucket."""
    out = [(s, self.batch_size, self.batch_size) for s in range(0, n - self.batch_size + 1, self.batch_size)]
    rest = n - len(out) * self.batch_size
    if rest:
      out.append((n - rest, rest, min(b for b in self.buckets if b >= rest)))
    return out

  @staticmethod
  def _pad(x, size: int):
    if x.shape[0] == size:
      return x
    return np.concatenate([x, np.zeros((size - x.shape[0], *x.shape[1:]), x.dtype)])


def _device_decision(logits_BxC, policy: str):
  """(score_B, pred_B) of one exit; patience's score needs earlier exits and is made on the host."""
  pred_B = jnp.argmax(logits_BxC, -1)
  if policy == "patience":
    return jnp.zeros(pred_B.shape, jnp.float32), pred_B
  score_1xB, _ = policies.scores(logits_BxC[None], policy)
  return score_1xB[0], pred_B


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
