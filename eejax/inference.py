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
simulation with the same thresholds. Thresholds: a threshold_ExC
(`eejax.thresholds`); the last exit always answers. Policies: any
`eejax.policies.Policy` (or its name), each exit scored by `Policy.exit_score`.
"""
import jax
import jax.numpy as jnp
import numpy as np

from eejax import input_pipeline, policies
from eejax.errors import UserError


def check_threshold(threshold_ExC, num_exits: int, num_classes: int):
  """The threshold itself, or a UserError: it must be (E, C), a row per exit and a column per class (an index past
  its columns would be clamped on the device, reading another class's threshold), and hold no NaN before its last
  row (a NaN passes no test: the exit would never answer, without a word). A traced threshold is checked for its
  shape only."""
  shape = np.shape(threshold_ExC)
  if shape != (num_exits, num_classes):
    raise UserError(f"a threshold of shape {shape}; expected threshold_ExC of shape ({num_exits}, {num_classes}): a "
                    f"row per exit, a column per class (eejax.thresholds.per_exit makes one from per-exit values)")
  if not isinstance(threshold_ExC, jax.core.Tracer):
    nan_E = np.isnan(np.asarray(threshold_ExC, np.float32)[:-1]).any(-1)
    if nan_E.any():
      raise UserError(f"threshold_ExC holds NaN at exit(s) {', '.join(str(e + 1) for e in np.flatnonzero(nan_E))}; "
                      f"give a number for every exit before the last (+inf: the exit never answers)")
  return threshold_ExC


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
    self.num_exits, self.num_classes = model.num_exits, model.num_classes
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

  def __call__(self, x_NxHxWx3, threshold_ExC, policy="max_prob"):
    """(pred_N, exit_N, cost_N) as numpy arrays, for any number N of images (a window at a time)."""
    threshold_ExC = np.asarray(check_threshold(threshold_ExC, self.num_exits, self.num_classes), np.float32)
    policy = policies.get(policy)
    outs = [self._window(x_NxHxWx3[i:i + self.window], threshold_ExC, policy)
            for i in range(0, x_NxHxWx3.shape[0], self.window)]
    if not outs:  # no images: the same three arrays, empty
      return np.zeros(0, np.int64), np.zeros(0, np.int64), self.cost_E[:0]
    return tuple(np.concatenate(parts) for parts in zip(*outs))

  def _window(self, x_NxHxWx3, threshold_ExC, policy):
    n = x_NxHxWx3.shape[0]
    pred_N, exit_N = np.zeros(n, np.int64), np.full(n, self.num_exits - 1)
    chunks = self._chunks(n)
    h_list = [self._stem(self._pad(x_NxHxWx3[s:s + m], size)) for s, m, size in chunks]
    active = np.arange(n)  # original index of each image still in play, in chunk order
    run, prev = np.zeros(n, np.int64), np.full(n, -1)
    for k in range(self.num_exits):
      outs = [self._segments[k](h) for h in h_list]
      decisions = jax.device_get([self._decide(logits, policy.name) for _, logits in outs])  # the stage's one sync
      score = np.concatenate([d[0][:m] for d, (_, m, _) in zip(decisions, chunks)])
      pred = np.concatenate([d[1][:m] for d, (_, m, _) in zip(decisions, chunks)])
      if policy.uses_run:  # the agreement run with the earlier exits, on the host
        run = np.asarray(policies.next_run(run, prev, pred))
        score = run.astype(np.float32)
      done = np.ones(len(active), bool) if k == self.num_exits - 1 else policy.passes(score, threshold_ExC[k][pred])
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
  """(score_B, pred_B) of one exit; a score that needs the earlier exits (patience) is made on the host."""
  policy = policies.get(policy)
  if policy.uses_run:
    return jnp.zeros(logits_BxC.shape[0], jnp.float32), jnp.argmax(logits_BxC, -1)
  score_B, pred_B, _ = policy.exit_score(logits_BxC, None, None)
  return score_B, pred_B


def early_exit_fn(model, variables, mean_C, std_C, policy="max_prob"):
  """f(x_1xHxWx3 uint8, threshold_ExC) -> (logits_1xC of the exit that answered, its 0-based index).

  A `lax.cond` after every exit but the last, so the decisions run inside the
  graph; the threshold is an input (jit- and export-ready, see eejax.export).
  """
  num_exits = model.num_exits
  policy = policies.get(policy)

  def from_exit(k, h, run_1, prev_1, threshold_ExC):
    h, logits_1xC = model.apply(variables, h, method=lambda m, h: m.segment(k, h))
    if k == num_exits - 1:
      return logits_1xC, jnp.int32(k)
    score_1, pred_1, run_1 = policy.exit_score(logits_1xC, run_1, prev_1)
    passes = policy.passes(score_1[0], threshold_ExC[k][pred_1[0]])
    return jax.lax.cond(passes, lambda: (logits_1xC, jnp.int32(k)),
                        lambda: from_exit(k + 1, h, run_1, pred_1, threshold_ExC))

  def run(x_1xHxWx3, threshold_ExC):
    threshold_ExC = jnp.asarray(check_threshold(threshold_ExC, num_exits, model.num_classes), jnp.float32)
    h = model.apply(variables, input_pipeline.normalize(x_1xHxWx3, mean_C, std_C), method=lambda m, x: m.stem(x))
    return from_exit(0, h, jnp.zeros(1, jnp.int32), jnp.full(1, -1), threshold_ExC)

  return run


def single_image_fn(model, variables, mean_C, std_C, cost_E, threshold_ExC, policy="max_prob"):
  """f(x_1xHxWx3 uint8) -> (pred, exit, cost): `early_exit_fn` with the thresholds fixed."""
  cascade = early_exit_fn(model, variables, mean_C, std_C, policy)
  cost_E = jnp.asarray(cost_E, jnp.float32)

  def run(x_1xHxWx3):
    logits_1xC, k = cascade(x_1xHxWx3, jnp.asarray(threshold_ExC, jnp.float32))
    return jnp.argmax(logits_1xC[0]).astype(jnp.int32), k, cost_E[k]

  return run


def export_single_image(fn, image_shape):
  """jax.export of `single_image_fn` for uint8 inputs of shape (1, *image_shape)."""
  return jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8))


def stage_fns(model, variables, mean_C, std_C):
  """[stage_k]: stage 0 maps x_1xHxWx3 uint8 to (h, logits_1xC); stage k > 0 maps h to (h, logits_1xC)."""
  def stage(k):
    def fn(inp):
      h = inp
      if k == 0:
        h = model.apply(variables, input_pipeline.normalize(inp, mean_C, std_C), method=lambda m, x: m.stem(x))
      return model.apply(variables, h, method=lambda m, h: m.segment(k, h))
    return fn
  return [stage(k) for k in range(model.num_exits)]
