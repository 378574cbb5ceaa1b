"""What a training step carries: the train state, the schedule and the optimizer, and the scanned chunk of steps.

Shared by the training loop (`eejax.train`), the run format (`eejax.run`, which
restores a checkpoint into this state) and BTS-EE's branch stages
(`eejax.boosted`).
"""
import math
import threading
from typing import Any

import flax
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


SCHEDULES = ("cosine", "step")


def make_schedule(train_cfg, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from 0 to train.learning_rate, then cosine to 0 or steps at train.step_epochs.

  A warm-up shorter than one step (warmup_epochs=0, or a fraction of an epoch of few steps) is none: the cosine
  starts at the peak on the first step."""
  total = train_cfg.epochs * steps_per_epoch
  warmup = int(train_cfg.warmup_epochs * steps_per_epoch)
  if train_cfg.schedule == "cosine":
    if warmup == 0:
      return optax.cosine_decay_schedule(train_cfg.learning_rate, max(total, 1))
    return optax.warmup_cosine_decay_schedule(0.0, train_cfg.learning_rate, warmup, max(total, warmup + 1))
  factors = {}  # step -> factor; an epoch listed twice, or two epochs on one step, step twice (a dict kept one)
  for e in train_cfg.step_epochs:
    b = int(e * steps_per_epoch) - warmup
    factors[b] = factors.get(b, 1.0) * train_cfg.step_factor
  return optax.join_schedules(
      [optax.linear_schedule(0.0, train_cfg.learning_rate, max(warmup, 1)),
       optax.piecewise_constant_schedule(train_cfg.learning_rate, factors)], [warmup])


def schedule_warning(train_cfg) -> str | None:
  """A line for each part of the schedule a run ends before (a preset's schedule under a shorter train.epochs): a
  warm-up that lasts the whole run, train.step_epochs it never reaches; None where there is none."""
  lines = []
  if 0 < train_cfg.epochs <= train_cfg.warmup_epochs:
    lines.append(f"warning: the warm-up lasts the whole run (train.warmup_epochs={train_cfg.warmup_epochs:g}, "
                 f"train.epochs={train_cfg.epochs:g}): the learning rate rises to its peak at the end and never "
                 "decays; give a shorter warm-up for a short run")
  late = [e for e in train_cfg.step_epochs if e >= train_cfg.epochs] if train_cfg.schedule == "step" else []
  if late:
    lines.append(f"warning: the learning rate never steps at epoch(s) {', '.join(f'{e:g}' for e in late)} of "
                 f"train.step_epochs: the run ends after {train_cfg.epochs}; give earlier ones for a shorter run")
  return "\n".join(lines) or None


def kernel_mask(params):
  """True at conv and dense kernels (ndim > 1): weight decay goes there, never to BatchNorm or biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def every_mask(params):
  """True everywhere: BatchNorm's scale and shift and every bias decay too (SDN's code, PyTorch's SGD default)."""
  return jax.tree.map(lambda p: True, params)


DECAY_MASKS = {"kernels": kernel_mask, "all": every_mask}  # train.weight_decay_on


OPTIMIZERS = ("sgd", "adam")  # train.optimizer


def make_optimizer(train_cfg, schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, or Adam; weight decay added to the gradient (L2, as PyTorch's SGD and Adam do
  it) on kernels only, or on every parameter with train.weight_decay_on=all. Either way the decay is masked, so
  the optimizer state has one layout and a checkpoint restores under either setting.

  train.grad_clip > 0 first scales the gradient down to that global norm at most.
  """
  # Without a clip the chain is the one runs were always saved with, so their checkpoints still restore.
  clip = train_cfg.grad_clip
  if train_cfg.get("optimizer", "sgd") == "adam":
    last = optax.adam(schedule)
  else:
    last = optax.sgd(schedule, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov)
  return optax.chain(
      *([optax.clip_by_global_norm(clip)] if clip > 0 else []),
      optax.add_decayed_weights(train_cfg.weight_decay, mask=DECAY_MASKS[train_cfg.weight_decay_on]),
      last)


INITS = ("flax", "pytorch")  # train.init: how the kernels are first drawn


def pytorch_init(params, key):
  """`params` with every convolution and dense kernel, and the bias beside it, drawn again as PyTorch draws them
  by default: uniform within +-1/sqrt(fan_in) (kaiming_uniform with a=sqrt(5): variance 1/(3 fan_in), where flax's
  lecun_normal has 1/fan_in and biases start at 0), fan_in being the kernel's size less its output channels.
  BatchNorm's scale and shift, and every other parameter, are kept."""
  flat = flax.traverse_util.flatten_dict(params)
  for i, path in enumerate(sorted(flat)):
    kernel = flat.get(path[:-1] + ("kernel",))
    if path[-1] in ("kernel", "bias") and kernel is not None and kernel.ndim > 1:
      bound = math.prod(kernel.shape[:-1]) ** -0.5
      flat[path] = jax.random.uniform(jax.random.fold_in(key, i), flat[path].shape, flat[path].dtype, -bound, bound)
  return flax.traverse_util.unflatten_dict(flat)


def init_state(model, tx, key, image_shape, init: str = "flax") -> TrainState:
  """Step 0: `model`'s initial variables (its kernels as `init` names: flax's own draw, or PyTorch's)."""
  variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32))
  params = variables["params"]
  if init == "pytorch":
    params = pytorch_init(params, jax.random.fold_in(key, 1))
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


def compile_ahead(jitted, *args):
  """A callable that runs `jitted` on arguments shaped and placed like `args`, compiled now on a thread of its own.

  The training loop compiles its last, shorter chunk this way while the device works through the others, instead
  of stopping for it at the end (tracing and compiling a ResNet-18 chunk takes about 20 s on a GPU host). Only
  shapes, dtypes and shardings are read from `args`, so they may be donated afterwards. The call waits for the
  compilation; where it failed, the call is the plain jitted call, which raises that error where it belongs.
  A process that ends before the call still waits for the compilation to finish.
  """
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=getattr(a, "sharding", None)),
                       args)
  compiled = []

  def work():
    try:
      compiled.append(jitted.lower(*specs).compile())
    except Exception:  # pylint: disable=broad-except  # raised again by the call, in the caller's thread
      pass

  thread = threading.Thread(target=work, name="eejax-compile-ahead")
  thread.start()

  def call(*call_args):
    thread.join()
    return compiled[0](*call_args) if compiled else jitted(*call_args)
  return call
