"""What a training step carries: the train state, the schedule and the optimizer, and the scanned chunk of steps.

Shared by the training loop (`eejax.train`), the run format (`eejax.run`, which
restores a checkpoint into this state) and BTS-EE's branch stages
(`eejax.boosted`).
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


SCHEDULES = ("cosine", "step")


def make_schedule(train_cfg, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from 0 to train.learning_rate, then cosine to 0 or steps at train.step_epochs."""
  total = train_cfg.epochs * steps_per_epoch
  warmup = int(train_cfg.warmup_epochs * steps_per_epoch)
  if train_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, train_cfg.learning_rate, max(warmup, 1), max(total, warmup + 1))
  boundaries = {int(e * steps_per_epoch): train_cfg.step_factor for e in train_cfg.step_epochs}
  return optax.join_schedules(
      [optax.linear_schedule(0.0, train_cfg.learning_rate, max(warmup, 1)),
       optax.piecewise_constant_schedule(train_cfg.learning_rate, {b - warmup: f for b, f in boundaries.items()})],
      [warmup])


def kernel_mask(params):
  """True at conv and dense kernels (ndim > 1): weight decay goes there, never to BatchNorm or biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(train_cfg, schedule) -> optax.GradientTransformation:
  """SGD with Nesterov momentum; weight decay on kernels only.

  train.grad_clip > 0 first scales the gradient down to that global norm at most.
  """
  # Without a clip the chain is the one runs were always saved with, so their checkpoints still restore.
  clip = train_cfg.grad_clip
  return optax.chain(
      *([optax.clip_by_global_norm(clip)] if clip > 0 else []),
      optax.add_decayed_weights(train_cfg.weight_decay, mask=kernel_mask),
      optax.sgd(schedule, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov))


def init_state(model, tx, key, image_shape) -> TrainState:
  variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32))
  params = variables["params"]
  return TrainState(jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}), tx.init(params))


def state_of(variables, tx) -> TrainState:
  """A step-0 state holding `variables`, with a fresh optimizer state (a model saved without training it)."""
  return TrainState(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"],
                    tx.init(variables["params"]))


def scan_chunk(step_fn, num_steps: int, unroll, out_shardings=None):
  """jit of (carry, *args) -> (carry, metrics_S...): `num_steps` calls of step_fn(carry, *args) under lax.scan.

  The carry is donated. `unroll=True` unrolls the loop (see `eejax.train`); with
  num_steps == 1 there is no scan at all and the metrics get a leading axis of 1.
  """
  def chunk(carry, *args):
    if num_steps == 1:
      carry, metrics = step_fn(carry, *args)
      return carry, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(lambda c, _: step_fn(c, *args), carry, None, length=num_steps, unroll=unroll)
  return jax.jit(chunk, donate_argnums=0, out_shardings=out_shardings)
