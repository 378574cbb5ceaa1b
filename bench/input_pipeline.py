"""Is the input path a bottleneck? On-device sampling + augmentation alone against the train step.

  python bench/input_pipeline.py [--batch 128] [--model resnet18 --width 0.25]

Times, on the same device and batch: (a) one jitted call that draws a batch's
indices from the epoch permutation, gathers the uint8 images, crops, flips and
normalises them (exactly what the training step does first), and (b) the whole
training step, and prints both rates and their ratio. If (a) is many times
faster than (b), the input path is not what limits training.
"""
import functools
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


def main():
  parser = cli.ArgumentParser("bench/input_pipeline.py", description=__doc__.splitlines()[0])
  on_cpu = jax.default_backend() == "cpu"
  parser.add_argument("--batch", type=cli.positive(int), default=128)
  parser.add_argument("--images", type=cli.positive(int), default=50_000)
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--width", type=cli.positive(float), default=0.25 if on_cpu else 1.0)
  args = parser.parse_args()
  n, b = args.images, args.batch
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  rng = np.random.default_rng(0)
  data = jax.device_put({"images": rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).astype(np.int32),
                         "mean": np.full(3, 0.5, np.float32), "std": np.full(3, 0.25, np.float32)}, rep)
  key = jax.random.key(0)

  @jax.jit
  def sample(step, data):
    idx = input_pipeline.batch_indices(key, step, num_examples=n, batch_size=b)
    x = input_pipeline.random_crop_flip(jax.random.fold_in(key, step), data["images"][idx])
    return input_pipeline.normalize(x, data["mean"], data["std"]), data["labels"][idx]

  config = cifar10.get_config("cpu")
  config.model.name, config.model.width = args.model, args.width
  model = build_model(config.model, 10)
  tx = make_optimizer(config.train, make_schedule(config.train, 100))
  state = jax.device_put(init_state(model, tx, jax.random.key(1), (32, 32, 3)), rep)
  step_fn = functools.partial(train.train_step, model=model, tx=tx, loss_fn=train.make_loss_fn(config, model.num_exits),
                              batch_size=b, crop_pad=4, flip=True, batch_sharding=sharding.batch_sharded(mesh))
  keys = jax.device_put((key, jax.random.key(2)), rep)
  step = jax.jit(lambda s: step_fn(s, data, keys, {}))  # the whole new state: nothing is left out; no donation

  input_rate = b / seconds_per_call(sample, jnp.int32(7), data, repeats=20)
  step_rate = b / seconds_per_call(step, state, repeats=5)
  print(f"hardware: {jax.devices()[0].device_kind} ({jax.default_backend()}), host {platform.machine()}, "
        f"jax {jax.__version__}; {n} images on the device, batch {b}")
  print(f"sampling + crop/flip/normalise alone: {input_rate:12,.0f} images/s")
  print(f"training step ({args.model} x{args.width}) : {step_rate:12,.0f} images/s")
  print(f"input path / train step             : {input_rate / step_rate:12.1f}x headroom")


if __name__ == "__main__":
  cli.guarded(main, "bench/input_pipeline.py")  # a mistake is one line, never a traceback
