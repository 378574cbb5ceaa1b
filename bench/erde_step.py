"""Cost of the jitted ERDE step against a plain student step plus a teacher forward.

  python bench/erde_step.py [--teacher resnet20] [--student resnet20 --student-width 0.5] [--batch 128]

All three are eejax's own jitted functions on the same random batch: the plain
(joint) student training step, the teacher's forward pass alone, and the ERDE
step (teacher forward and student forward/backward in one jitted step). The
ERDE step should cost at most 1.5x the sum of the other two. Training steps run
--steps-per-call at a time under lax.scan (as in training), each timed over
--steps steps after a compiling call, with nothing copied between calls.
Hardware printed.
"""
import functools
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/, from any folder
from configs import cifar10  # pylint: disable=wrong-import-position
from timing import seconds_per_call
from eejax import cli, losses, sharding, train
from eejax.run import build_model
from eejax.state import init_state, make_optimizer


def step_seconds(chunk, state, data, keys, frozen, steps, per_call):
  """Seconds per training step of `chunk` (per_call steps a call; the state is donated and carried on)."""
  state, metrics = chunk(state, data, keys, frozen)  # compile
  jax.block_until_ready(metrics)
  calls = max(1, steps // per_call)
  start = time.perf_counter()
  for _ in range(calls):
    state, metrics = chunk(state, data, keys, frozen)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / (calls * per_call)


def main():
  parser = cli.ArgumentParser("bench/erde_step.py", description=__doc__.splitlines()[0])
  parser.add_argument("--teacher", default="resnet20")
  parser.add_argument("--student", default="resnet20")
  parser.add_argument("--student-width", type=cli.positive(float), default=0.5)
  parser.add_argument("--batch", type=cli.positive(int), default=128)
  parser.add_argument("--dtype", default="float32")
  on_cpu = jax.default_backend() == "cpu"
  parser.add_argument("--steps", type=cli.positive(int), default=4 if on_cpu else 100)
  parser.add_argument("--steps-per-call", type=cli.positive(int), default=1 if on_cpu else 10)
  args = parser.parse_args()

  mesh = sharding.make_mesh()
  rep, batch_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  config = cifar10.get_config("erde")
  config.model.name, config.model.width, config.model.dtype = args.student, args.student_width, args.dtype
  student = build_model(config.model, 10)
  teacher_cfg = cifar10.get_config("erde_teacher")
  teacher_cfg.model.name, teacher_cfg.model.dtype = args.teacher, args.dtype
  teacher = build_model(teacher_cfg.model, 10)
  n = 4 * args.batch
  rng = np.random.default_rng(0)
  data = {"images": jnp.asarray(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)),
          "labels": jnp.asarray(rng.integers(0, 10, n).astype(np.int32)),
          "mean": jnp.full(3, 0.5), "std": jnp.full(3, 0.25)}
  keys = (jax.random.key(1), jax.random.key(2))
  tx = make_optimizer(config.train, lambda step: 0.01)
  state = init_state(student, tx, jax.random.key(0), (32, 32, 3))
  teacher_vars = teacher.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  pairs = losses.pair_exits(student.num_exits, teacher.num_exits)

  common = dict(model=student, tx=tx, batch_size=args.batch, crop_pad=4, flip=True, batch_sharding=batch_sharding)
  config.scheme = "joint"
  plain = train.make_train_chunk(functools.partial(train.train_step, loss_fn=train.make_loss_fn(config,
                                                                                                student.num_exits),
                                                   **common), args.steps_per_call, rep)
  config.scheme = "erde"
  erde = train.make_train_chunk(functools.partial(train.train_step, loss_fn=train.make_loss_fn(config,
                                                                                               student.num_exits),
                                                  teacher=lambda v, x: teacher.apply(v, x)[0][jnp.asarray(pairs)],
                                                  **common), args.steps_per_call, rep)
  x = data["images"][:args.batch].astype(jnp.float32) / 255
  forward = jax.jit(lambda v, x: teacher.apply(v, x)[0])

  copy = lambda s: jax.tree.map(jnp.copy, s)  # the steps donate their state
  plain_s = step_seconds(plain, copy(state), data, keys, None, args.steps, args.steps_per_call)
  erde_s = step_seconds(erde, copy(state), data, keys, teacher_vars, args.steps, args.steps_per_call)
  forward_s = seconds_per_call(forward, teacher_vars, x, repeats=max(10, args.steps))
  print(f"hardware: {jax.devices()[0].device_kind} ({jax.default_backend()}), host {platform.machine()}, "
        f"jax {jax.__version__}; batch {args.batch}, {args.dtype}")
  print(f"teacher {args.teacher}, student {args.student} x{args.student_width}")
  print(f"plain student step     : {1e3 * plain_s:9.2f} ms")
  print(f"teacher forward alone  : {1e3 * forward_s:9.2f} ms")
  print(f"ERDE step (both, fused): {1e3 * erde_s:9.2f} ms")
  print(f"ERDE / (plain + forward): {erde_s / (plain_s + forward_s):.3f}  (target <= 1.5)")
  print(f"ERDE / plain student   : {erde_s / plain_s:.3f}")


if __name__ == "__main__":
  cli.guarded(main, "bench/erde_step.py")  # a mistake is one line, never a traceback
