"""Real batched early exit against the full network, on whatever device is present.

  python bench/early_exit.py --workdir W            # a trained run: its val-fitted 50% thresholds, test images
  python bench/early_exit.py --workdir W --data folder:PATH   # ... whose dataset has moved since it trained
  python bench/early_exit.py --model resnet18       # untrained, random images, thresholds at exit medians

Prints images/s of the full network (every exit computed, batch after batch)
and of real early exit over the same images (after each exit the images still
in play are regrouped into dense batches; the others are not computed
further), their ratio (the measured speedup) and the speedup the MACs predict
for the same decisions. Each path runs once untimed first (compilation), then
the fastest of --repeats passes counts.
"""
import platform

import jax
import jax.numpy as jnp
import numpy as np

from eejax import cli, evaluate, inference, input_pipeline, policies, thresholds
from eejax.errors import UserError
from eejax.flops import exit_macs
from eejax.models import MultiExitNet


def from_workdir(workdir, source=""):
  """A finished run, its test images (from `source` where given) and its max_prob thresholds fitted for half the
  MACs (no training images read)."""
  from eejax import data, run  # pylint: disable=g-import-not-at-top
  r = run.load_run(workdir)
  if source:
    r.use_data(source)
  try:
    ds = data.from_config(r.config.data)
  except UserError as e:
    raise UserError(f"{e} (here: where the run's dataset moved since it trained, give --data=SOURCE)") from None
  entries = thresholds.load(workdir, r.model.num_exits, r.model.num_classes)
  threshold_ExC = thresholds.pick(entries, "max_prob", 0.5)["threshold_ExC"]
  mean, std = r.spec.stats
  return r.model, r.variables, ds.test.images_NxHxWx3, mean, std, threshold_ExC


def untrained(name, n, num_classes=10):
  model = MultiExitNet(name, num_classes)
  images = np.random.default_rng(0).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  mean, std = input_pipeline.channel_stats(images)
  logits = jax.jit(lambda v, x: model.apply(v, input_pipeline.normalize(x, mean, std))[0])(variables, images[:512])
  conf, _ = policies.max_prob(logits)
  threshold = thresholds.per_exit(np.median(np.asarray(conf[:-1]), axis=1), model.num_exits, num_classes, "max_prob")
  return model, variables, images, mean, std, threshold


def main():
  parser = cli.ArgumentParser("bench/early_exit.py", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir")
  parser.add_argument("--data", default="", help="data.source of the run's images where they moved since it trained")
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--batch-size", type=cli.positive(int), default=1000)
  parser.add_argument("--images", type=cli.positive(int), default=10_000)
  parser.add_argument("--repeats", type=cli.positive(int), default=3)
  args = parser.parse_args()
  model, variables, images, mean, std, threshold = (from_workdir(args.workdir, args.data) if args.workdir
                                                    else untrained(args.model, args.images))
  macs = exit_macs(model, images.shape[1:])
  runner = inference.BatchedEarlyExit(model, variables, mean, std, macs.cumulative, args.batch_size)
  n = images.shape[0] // args.batch_size * args.batch_size
  images = images[:n]
  full = lambda: jax.block_until_ready([runner.full(images[i:i + args.batch_size])
                                        for i in range(0, n, args.batch_size)])
  full_rate, _ = evaluate.timed_rate(full, n, args.repeats)
  exit_rate, (_, exits, _) = evaluate.timed_rate(lambda: runner(images, threshold), n, args.repeats)
  predicted = macs.full / np.asarray(macs.cumulative)[exits].mean()
  print(f"hardware: {jax.devices()[0].device_kind} ({jax.default_backend()}), host {platform.machine()}, "
        f"jax {jax.__version__}")
  print(f"model: {model.arch} ({model.num_exits} exits), {n} images in batches of {args.batch_size}, "
        f"{'trained: ' + args.workdir if args.workdir else 'untrained, random images'}")
  print(f"exits taken: {np.bincount(exits, minlength=model.num_exits).tolist()}")
  print(f"full network      : {full_rate:10,.0f} images/s")
  print(f"real early exit   : {exit_rate:10,.0f} images/s")
  print(f"measured speedup  : {exit_rate / full_rate:10.2f}x   MACs-predicted speedup: {predicted:.2f}x")


if __name__ == "__main__":
  cli.guarded(main, "bench/early_exit.py")  # a mistake is one line, never a traceback
