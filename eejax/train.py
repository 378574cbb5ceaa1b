"""Training: the train state, the jitted multi-step train function and the loop.

Order of initialisation (see `train_and_evaluate`): resume from the workdir's
latest checkpoint, else `config.init_from` (parameters and BatchNorm statistics
of another run), else from scratch with `config.seed`.
"""
import functools
import json
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from eejax import checkpoint, data, evaluate, input_pipeline, losses, sharding
from eejax.errors import UserError, unknown_name
from eejax.flops import exit_macs
from eejax.models import HEADS, MultiExitNet
from eejax.models.resnet import get_arch
from eejax.writers import MetricWriter, Progress

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def build_model(model_cfg, num_classes: int, ensemble_teachers: bool = False) -> MultiExitNet:
  if model_cfg.dtype not in DTYPES:
    raise unknown_name("model.dtype", model_cfg.dtype, DTYPES)
  exit_after = None if model_cfg.exit_after is None else tuple(model_cfg.exit_after)
  model = MultiExitNet(model_cfg.name, num_classes, width=model_cfg.width, exit_after=exit_after,
                       head=model_cfg.head, head_width=model_cfg.head_width,
                       head_dropout=model_cfg.get("head_dropout", 0.0),
                       exit_grad_scale=model_cfg.get("exit_grad_scale", 1.0), ensemble_teachers=ensemble_teachers,
                       dtype=DTYPES[model_cfg.dtype])
  model.num_exits  # pylint: disable=pointless-statement  # validates names and exit points now
  return model


def check_names(config) -> None:
  """Unknown model, head, dtype, scheme or schedule names fail here, before any data is loaded."""
  get_arch(config.model.name)
  if config.model.head not in HEADS:
    raise unknown_name("head", config.model.head, HEADS)
  if config.model.dtype not in DTYPES:
    raise unknown_name("model.dtype", config.model.dtype, DTYPES)
  if config.scheme not in SCHEMES:
    raise unknown_name("scheme", config.scheme, SCHEMES)
  if config.train.schedule not in ("cosine", "step"):
    raise unknown_name("train.schedule", config.train.schedule, ("cosine", "step"))


def make_schedule(train_cfg, steps_per_epoch: int) -> optax.Schedule:
  total = train_cfg.epochs * steps_per_epoch
  warmup = int(train_cfg.warmup_epochs * steps_per_epoch)
  if train_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, train_cfg.learning_rate, max(warmup, 1), max(total, warmup + 1))
  if train_cfg.schedule == "step":
    boundaries = {int(e * steps_per_epoch): train_cfg.step_factor for e in train_cfg.step_epochs}
    return optax.join_schedules(
        [optax.linear_schedule(0.0, train_cfg.learning_rate, max(warmup, 1)),
         optax.piecewise_constant_schedule(train_cfg.learning_rate, {b - warmup: f for b, f in boundaries.items()})],
        [warmup])
  raise unknown_name("train.schedule", train_cfg.schedule, ("cosine", "step"))


def make_optimizer(train_cfg, schedule) -> optax.GradientTransformation:
  """SGD with Nesterov momentum; weight decay on kernels only (not BN, not biases).

  train.grad_clip > 0 first scales the gradient down to that global norm at most.
  """
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  clip = train_cfg.get("grad_clip", 0.0)
  # Without a clip the chain is the one runs were always saved with, so their checkpoints still restore.
  return optax.chain(
      *([optax.clip_by_global_norm(clip)] if clip > 0 else []),
      optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask),
      optax.sgd(schedule, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov))


def init_state(model, tx, key, image_shape) -> TrainState:
  variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32))
  params = variables["params"]
  return TrainState(jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}), tx.init(params))


def train_step(state: TrainState, data_dev, keys, frozen, *, model, tx, loss_fn: Callable, batch_size: int,
               crop_pad: int, flip: bool, batch_sharding, teacher=None, schedule=None):
  """One SGD step on the batch that `state.step` selects. Pure: (state, ...) -> (state, metrics).

  `frozen` holds what does not train and is never saved: {"teacher": variables}
  for distillation schemes, whose `teacher` = (model, pairs_E) runs forward in
  this same step on the same augmented batch.
  """
  data_key, train_key = keys
  idx_B = input_pipeline.batch_indices(data_key, state.step, num_examples=data_dev["labels"].shape[0],
                                       batch_size=batch_size)
  idx_B = jax.lax.with_sharding_constraint(idx_B, batch_sharding)
  aug_key, dropout_key = jax.random.split(jax.random.fold_in(train_key, state.step))
  x_BxHxWx3 = input_pipeline.random_crop_flip(aug_key, data_dev["images"][idx_B], pad=crop_pad, flip=flip)
  x_BxHxWx3 = input_pipeline.normalize(x_BxHxWx3, data_dev["mean"], data_dev["std"])
  labels_B = data_dev["labels"][idx_B]
  teacher_logits = None
  if teacher is not None:
    teacher_model, pairs_E = teacher
    teacher_logits_TxBxC, _ = teacher_model.apply(frozen["teacher"], x_BxHxWx3, train=False)
    teacher_logits = jax.lax.stop_gradient(teacher_logits_TxBxC[jnp.asarray(pairs_E)])

  def loss_of(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    (logits_ExBxC, aux), updates = model.apply(variables, x_BxHxWx3, train=True, mutable=["batch_stats"],
                                               rngs={"dropout": dropout_key})
    loss, metrics = loss_fn(logits_ExBxC, labels_B, teacher_logits, aux)
    return loss, (updates["batch_stats"], logits_ExBxC, metrics)

  (loss, (batch_stats, logits_ExBxC, metrics)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  accuracy_E = jnp.mean(jnp.argmax(logits_ExBxC, -1) == labels_B, axis=1)
  metrics = {"loss": loss, **metrics, "accuracy_E": accuracy_E, "grad_norm": optax.tree.norm(grads)}
  if schedule is not None:
    metrics["learning_rate"] = schedule(state.step)
  return TrainState(state.step + 1, params, batch_stats, opt_state), metrics


def make_train_chunk(step_fn, num_steps: int, replicated):
  """jit of `num_steps` calls of step_fn under lax.scan; the state is donated.

  On the CPU backend the scan is fully unrolled: XLA:CPU runs convolutions
  inside a while loop about 35x slower than outside one (measured with jax
  0.10.2 on a ResNet-8 step: 11.5 s against 0.31 s), so keep steps_per_call
  small there. Accelerators keep the rolled loop.
  """
  unroll = True if jax.default_backend() == "cpu" else 1  # True: no loop at all, even for one step

  def chunk(state, data_dev, keys, frozen):
    if num_steps == 1:  # no scan: XLA:CPU keeps a one-trip loop and runs it as slowly as any other
      state, metrics = step_fn(state, data_dev, keys, frozen)
      return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(lambda s, _: step_fn(s, data_dev, keys, frozen), state, None, length=num_steps, unroll=unroll)
  return jax.jit(chunk, donate_argnums=0, out_shardings=(replicated, replicated))


def make_loss_fn(config, num_exits: int):
  """The scheme's objective: (logits_ExBxC, labels_B, teacher_logits_ExBxC | None, aux) -> (loss, metrics)."""
  weights = config.train.exit_weights
  weights = (1.0,) * num_exits if weights is None else tuple(weights)
  if len(weights) != num_exits:
    raise UserError(f"train.exit_weights has {len(weights)} values; the model has {num_exits} exits")
  if config.scheme == "joint":
    def joint(logits_ExBxC, labels_B, teacher_logits, aux):
      del teacher_logits, aux
      loss, ce_E = losses.joint_loss(logits_ExBxC, labels_B, weights, config.train.label_smoothing)
      return loss, {"ce_E": ce_E}
    return joint
  if config.scheme == "erde":
    erde = config.erde
    return lambda logits, labels, teacher_logits, aux: losses.erde_loss(
        logits, teacher_logits, labels, weights, temperature=erde.temperature, kd_weight=erde.kd_weight,
        entropy_weight=erde.entropy_weight, drop_kd_on_errors=erde.drop_kd_on_errors, reference=erde.reference,
        label_smoothing=config.train.label_smoothing)
  if config.scheme == "mate":
    mate = config.mate
    return lambda logits, labels, teacher_logits, aux: losses.mate_loss(
        logits, labels, aux["ensemble_logits_JxE"], weights, temperature=mate.temperature,
        primary_weight=mate.primary_weight, kd_weight=mate.kd_weight, label_smoothing=config.train.label_smoothing)
  if config.scheme == "byot":
    return lambda logits, labels, teacher_logits, aux: losses.byot_loss(
        logits, labels, weights, temperature=config.byot.temperature, kd_weight=config.byot.kd_weight,
        label_smoothing=config.train.label_smoothing)
  raise unknown_name("scheme", config.scheme, SCHEMES)


SCHEMES = ("joint", "erde", "mate", "byot", "boosted")  # boosted: BTS-EE, eejax.bts


def load_teacher(config, model, image_shape, num_classes: int, mesh):
  """(teacher, frozen) for distillation schemes, ((model, pairs_E), {"teacher": variables}); else (None, {})."""
  if config.scheme != "erde":
    return None, {}
  if not config.erde.teacher:
    raise UserError("scheme=erde needs --config.erde.teacher=WORKDIR, the workdir of a trained teacher run")
  teacher_config, teacher_model, variables = load_run(config.erde.teacher, mesh)
  with open(os.path.join(config.erde.teacher, "run.json"), encoding="utf-8") as f:
    run = json.load(f)
  if run["num_classes"] != num_classes or tuple(run["image_shape"]) != tuple(image_shape):
    raise UserError(f"the teacher in {config.erde.teacher} was trained on {run['num_classes']} classes of "
                    f"{run['image_shape']} images; this run has {num_classes} classes of {list(image_shape)}")
  pairing = None if config.erde.pairing is None else tuple(config.erde.pairing)
  try:
    pairs = losses.pair_exits(model.num_exits, teacher_model.num_exits, pairing)
  except ValueError as e:
    raise UserError(f"erde.pairing: {e}") from None
  print(f"teacher: {teacher_config.model.name} ({teacher_model.num_exits} exits) from {config.erde.teacher}; "
        f"student exit -> teacher exit: {[p + 1 for p in pairs]}")
  return (teacher_model, pairs), {"teacher": variables}


def load_dataset(data_cfg) -> data.Dataset:
  return data.load(data_cfg.source, val_size=data_cfg.val_size, val_seed=data_cfg.val_seed,
                   image_size=data_cfg.image_size, cache_dir=data_cfg.cache_dir,
                   tfds_data_dir=data_cfg.tfds_data_dir, download=data_cfg.download,
                   max_images=data_cfg.max_images, test_split=data_cfg.get("test_split", "test"))


def _check_finite(metrics_S, first_step: int, last_saved) -> None:
  loss_S = np.asarray(metrics_S["loss"])
  bad = np.flatnonzero(~np.isfinite(loss_S))
  if bad.size:
    saved = "no checkpoint yet" if last_saved is None else f"last checkpoint: step {last_saved}"
    raise UserError(f"the loss became {loss_S[bad[0]]} at step {first_step + bad[0] + 1}; the run stopped "
                    f"without saving that state ({saved}). Lower "
                    f"train.learning_rate, or use model.dtype=float32")


def _summary(metrics_S) -> dict:
  out = {"train/loss": float(np.mean(metrics_S["loss"]))}
  if "grad_norm" in metrics_S:  # the largest in the chunk: a spike is what matters
    out["train/grad_norm_max"] = float(np.max(metrics_S["grad_norm"]))
  if "learning_rate" in metrics_S:
    out["train/learning_rate"] = float(metrics_S["learning_rate"][-1])
  for name, values_SxE in metrics_S.items():
    if name.endswith("_E"):
      for e, value in enumerate(np.mean(values_SxE, axis=0)):
        out[f"train/{name[:-2]}_exit{e + 1}"] = float(value)
  return out


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint), then writes the report."""
  check_names(config)
  if config.scheme == "boosted":  # branches on a frozen backbone run: its own job
    from eejax import bts  # pylint: disable=g-import-not-at-top
    return bts.train_and_evaluate(config, workdir)
  sharding.initialize_distributed(config.distributed)
  mesh = sharding.make_mesh()
  replicated, batch_sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  batch_size = config.train.batch_size
  sharding.check_batch_size(batch_size, mesh)
  sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")

  ds = load_dataset(config.data)
  model = build_model(config.model, ds.num_classes, ensemble_teachers=config.scheme == "mate")
  steps_per_epoch = len(ds.train) // batch_size
  if steps_per_epoch == 0:
    raise UserError(f"train.batch_size={batch_size} is larger than the training set ({len(ds.train)} images)")
  total_steps = config.train.epochs * steps_per_epoch
  schedule = make_schedule(config.train, steps_per_epoch)
  tx = make_optimizer(config.train, schedule)
  loss_fn = make_loss_fn(config, model.num_exits)

  if jax.process_index() == 0:
    write_run_files(workdir, config, ds.num_classes, ds.image_shape)

  init_key, data_key, train_key = jax.random.split(jax.random.key(config.seed), 3)
  init_fn = jax.jit(functools.partial(init_state, model, tx), static_argnums=1, out_shardings=replicated)
  abstract = checkpoint.as_abstract(jax.eval_shape(init_fn, init_key, ds.image_shape), replicated)
  mngr = checkpoint.manager(workdir, config.checkpoint.max_to_keep)
  state = checkpoint.restore(mngr, abstract)
  if state is not None:
    print(f"resuming from {workdir} at step {int(state.step)}")
  else:
    state = init_fn(init_key, ds.image_shape)
    if config.init_from:
      _, _, variables = load_run(config.init_from, mesh)
      if jax.tree.map(jnp.shape, variables["params"]) != jax.tree.map(jnp.shape, state.params):
        raise UserError(f"init_from={config.init_from!r} holds a different model from model.name={config.model.name!r} "
                        f"with these settings; start from scratch or match the model config")
      state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
      print(f"initialised from {config.init_from} (parameters and BatchNorm statistics)")

  mean_C, std_C = input_pipeline.channel_stats(ds.train.images_NxHxWx3)
  data_dev = {"images": sharding.put_replicated(ds.train.images_NxHxWx3, mesh),
              "labels": sharding.put_replicated(ds.train.labels_N, mesh),
              "mean": sharding.put_replicated(mean_C, mesh), "std": sharding.put_replicated(std_C, mesh)}
  keys = (data_key, train_key)
  teacher, frozen = load_teacher(config, model, ds.image_shape, ds.num_classes, mesh)
  step_fn = functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn, batch_size=batch_size,
                              crop_pad=config.data.crop_pad, flip=config.data.flip, batch_sharding=batch_sharded,
                              teacher=teacher, schedule=schedule)
  chunks = {}  # scan length -> jitted function; at most two lengths (the usual and the last)

  step = int(state.step)
  last_saved = step if mngr.latest_step() is not None else None
  writer = MetricWriter(workdir, tensorboard=config.log.tensorboard)
  progress = Progress(total_steps, batch_size, every_s=config.log.every_s)
  per_call = max(1, config.train.steps_per_call)
  print(f"training {config.model.name} ({model.num_exits} exits) on {len(ds.train)} images: {total_steps} steps "
        f"of {batch_size} ({config.train.epochs} epochs) on {mesh.size} {jax.devices()[0].platform} device(s)")
  pending = None  # (first_step, metrics) of the chunk in flight, pulled after the next is dispatched

  def pull(pending):
    first, metrics = pending
    metrics = sharding.to_host(metrics)
    _check_finite(metrics, first, last_saved)
    end = first + len(metrics["loss"])
    writer.write(end, _summary(metrics))
    progress.update(end, float(metrics["loss"][-1]))

  with checkpoint.StopSignal() as stop:
    while step < total_steps:
      n = min(per_call, total_steps - step)
      if n not in chunks:
        chunks[n] = make_train_chunk(step_fn, n, replicated)
      # The steady-state loop never copies from the host: everything the step reads is on the device.
      with jax.transfer_guard_host_to_device(config.train.get("transfer_guard", "disallow")):
        state, metrics = chunks[n](state, data_dev, keys, frozen)
      if pending is not None:
        pull(pending)
      pending, step = (step, metrics), step + n
      stop_now = stop.signum is not None
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        stop_now = bool(multihost_utils.process_allgather(np.asarray(stop_now)).any())
      crossed_save = step // config.checkpoint.every_steps > (step - n) // config.checkpoint.every_steps
      if stop_now or crossed_save or step == total_steps:
        pull(pending)
        pending = None
        checkpoint.save(mngr, step, state)
        last_saved = step
        if stop_now:
          progress.close()
          writer.close()
          raise checkpoint.Stopped(stop.signum or 15, step, workdir)
  progress.close()
  images_per_s = progress.images_per_second(step)

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  macs = exit_macs(model, ds.image_shape)
  t0 = time.perf_counter()
  extra = {"train_images_per_s": images_per_s, "train_steps": total_steps}
  if "ensemble_logits" in state.params:  # MATE: the learned teacher weights, softmax(a_j) over exits
    extra["ensemble_weights"] = np.asarray(jax.nn.softmax(sharding.to_host(state.params["ensemble_logits"]),
                                                          axis=-1)).tolist()
  report = evaluate.evaluate_and_report(model, variables, ds, macs, config, workdir, mesh, extra=extra,
                                        mean_std=(mean_C, std_C))
  writer.write(step, {f"test/accuracy_exit{e['exit']}": e["accuracy"] for e in report["exits"]})
  writer.close()
  print(f"evaluation took {time.perf_counter() - t0:.1f}s; report in {workdir}/report.md")
  return report



def write_run_files(workdir: str, config, num_classes: int, image_shape) -> None:
  """config.json and run.json: what `load_run` needs to rebuild this run's model."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "run.json"), "w", encoding="utf-8") as f:
    json.dump({"num_classes": int(num_classes), "image_shape": [int(d) for d in image_shape]}, f)


def load_run(workdir: str, mesh=None):
  """(config, model, variables) of a finished or running eejax workdir, from its latest checkpoint."""
  paths = [os.path.join(workdir, name) for name in ("config.json", "run.json")]
  if not all(os.path.exists(p) for p in paths):
    raise UserError(f"{workdir!r} is not an eejax workdir (no config.json and run.json); give the --workdir of a run")
  with open(paths[0], encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(paths[1], encoding="utf-8") as f:
    run = json.load(f)
  model = build_model(config.model, run["num_classes"], ensemble_teachers=config.scheme == "mate")
  tx = make_optimizer(config.train, optax.constant_schedule(0.0))
  mesh = mesh or sharding.make_mesh()
  abstract = jax.eval_shape(functools.partial(init_state, model, tx, image_shape=tuple(run["image_shape"])),
                            jax.random.key(0))
  state = checkpoint.restore_from_workdir(workdir, checkpoint.as_abstract(abstract, sharding.replicated(mesh)))
  return config, model, {"params": state.params, "batch_stats": state.batch_stats}
