"""Where a training step's time goes: the step against parts of it, and the costliest kernels of a trace.

  python bench/step_breakdown.py [--model resnet18 --width 1 --batch 512 --dtype bfloat16] [--trace DIR]

Times, on one device and one random batch, each jitted and run --steps times
after a compiling call: (a) the whole training step as training runs it
(`--steps-per-call` steps under lax.scan, the state carried), (b) forward and
backward without the optimizer update, (c) the training-mode forward alone,
(d) the inference forward alone, (e) the input path alone (sampling, crop,
flip, normalise). Differences between them place the time: the optimizer and
the BatchNorm-statistics update (a - b), the backward pass (b - c), and so on.
With --trace, a few steps of (a) run under `jax.profiler.trace` and the
Perfetto trace it writes is summarised here: the 25 events (kernels, on a GPU)
with the most total time, so the table needs no profiler UI. The peer for this
benchmark is the whole step itself: each part is printed as a share of it.
"""
import collections
import functools
import glob
import gzip
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/, from any folder
from configs import cifar10  # pylint: disable=wrong-import-position
from timing import seconds_per_call
from eejax import cli, input_pipeline, sharding, train
from eejax.run import build_model
from eejax.state import init_state, make_optimizer, make_schedule


def top_events(trace_dir, count=25):
  """[(name, total ms, calls)] of the complete events in the Perfetto trace under trace_dir, most time first."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    return []
  with gzip.open(max(paths, key=os.path.getmtime), "rt", encoding="utf-8") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e and not e["name"].startswith("$"):  # "$...": Python frames
      total[e["name"]] += e["dur"] / 1e3
      calls[e["name"]] += 1
  return [(name, ms, calls[name]) for name, ms in total.most_common(count)]


def main():
  parser = cli.ArgumentParser("bench/step_breakdown.py", description=__doc__.splitlines()[0])
  on_cpu = jax.default_backend() == "cpu"
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--width", type=cli.positive(float), default=0.25 if on_cpu else 1.0)
  parser.add_argument("--batch", type=cli.positive(int), default=32 if on_cpu else 512)
  parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
  parser.add_argument("--steps", type=cli.positive(int), default=4 if on_cpu else 50)
  parser.add_argument("--steps-per-call", type=cli.positive(int), default=1 if on_cpu else 10)
  parser.add_argument("--trace", help="write a profiler trace of a few training steps here and summarise it")
  args = parser.parse_args()
  b = args.batch
  config = cifar10.get_config("cpu")
  config.model.name, config.model.width, config.model.dtype = args.model, args.width, args.dtype
  model = build_model(config.model, 10)
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  tx = make_optimizer(config.train, make_schedule(config.train, 100))
  state = jax.device_put(init_state(model, tx, jax.random.key(0), (32, 32, 3)), rep)
  rng = np.random.default_rng(0)
  n = 8 * b
  data = jax.device_put({"images": rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).astype(np.int32),
                         "mean": np.full(3, 0.5, np.float32), "std": np.full(3, 0.25, np.float32)}, rep)
  keys = jax.device_put((jax.random.key(1), jax.random.key(2)), rep)
  loss_fn = train.make_loss_fn(config, model.num_exits)
  step_fn = functools.partial(train.train_step, model=model, tx=tx, loss_fn=loss_fn, batch_size=b, crop_pad=4,
                              flip=True, batch_sharding=sharding.batch_sharded(mesh))
  chunk = train.make_train_chunk(step_fn, args.steps_per_call, rep)

  def whole_step():
    nonlocal state
    state, metrics = chunk(state, data, keys, {})
    return metrics

  x = input_pipeline.normalize(data["images"][:b], data["mean"], data["std"])
  y = data["labels"][:b]
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def train_forward(params):
    (logits, aux), _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return loss_fn(logits, y, None, aux)[0]

  sample = jax.jit(lambda step: input_pipeline.normalize(input_pipeline.random_crop_flip(
      jax.random.key(3), data["images"][input_pipeline.batch_indices(jax.random.key(4), step, num_examples=n,
                                                                     batch_size=b)]), data["mean"], data["std"]))
  calls = max(1, args.steps // args.steps_per_call)
  parts = {  # (a) last: its calls donate the state the others read
      "(b) forward + backward": seconds_per_call(jax.jit(jax.grad(train_forward)), state.params, repeats=args.steps),
      "(c) training forward": seconds_per_call(jax.jit(train_forward), state.params, repeats=args.steps),
      "(d) inference forward": seconds_per_call(jax.jit(lambda v: model.apply(v, x)[0]), variables,
                                                repeats=args.steps),
      "(e) input path": seconds_per_call(sample, jnp.int32(5), repeats=args.steps),
  }
  parts = {"(a) training step": seconds_per_call(whole_step, repeats=calls) / args.steps_per_call, **parts}
  print(f"hardware: {jax.devices()[0].device_kind} ({jax.default_backend()}), host {platform.machine()}, "
        f"jax {jax.__version__}; {args.model} x{args.width}, {model.num_exits} exits, batch {b}, {args.dtype}")
  whole = parts["(a) training step"]
  for name, seconds in parts.items():
    print(f"{name:24s}: {1e3 * seconds:9.3f} ms  {100 * seconds / whole:6.1f}% of the step  "
          f"({b / seconds:12,.0f} images/s)")
  if args.trace:
    whole_step()
    with jax.profiler.trace(args.trace, create_perfetto_trace=True):
      for _ in range(3):
        metrics = whole_step()
      jax.block_until_ready(metrics)
    rows = top_events(args.trace)
    traced = 3 * args.steps_per_call
    print(f"profile: {traced} training steps under jax.profiler.trace ({args.trace}); events with the most time:")
    for name, ms, count in rows:
      print(f"  {ms / traced:9.3f} ms/step  {count // traced:5d}x/step  {name[:110]}")
    if not rows:
      print("  (no Perfetto trace was written)")


if __name__ == "__main__":
  cli.guarded(main, "bench/step_breakdown.py")  # a mistake is one line, never a traceback
