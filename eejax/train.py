"""Training: the pure jitted step, `lax.scan` over steps, and the one training loop.

Order of initialisation (see `train_and_evaluate`): resume from the workdir's
latest checkpoint, else `config.init_from` (parameters and BatchNorm statistics
of another run), else from scratch with `config.seed`. The scheme
(`eejax.schemes`) supplies the loss, what else trains and any frozen teacher;
the loop never tests its name.
"""
import functools
import os
import signal
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eejax import (checkpoint, collectives, data, evaluate, history, input_pipeline, run, schemes, sharding, signals,
                   workdirs)
from eejax.errors import UserError
from eejax.flops import exit_macs
from eejax.state import (TrainState, compile_ahead, init_state, make_optimizer, make_schedule, scan_chunk,
                          schedule_warning)
from eejax.writers import MetricWriter, Progress, on_main_process, say


class RunKeys(NamedTuple):
  init: jax.Array  # the initial parameters
  data: jax.Array  # each epoch's order of the images
  train: jax.Array  # each step's augmentation and dropout


def run_keys(seed: int) -> RunKeys:
  """The three keys of a run's randomness, all from `config.seed`."""
  return RunKeys(*jax.random.split(jax.random.key(seed), 3))


def train_step(state: TrainState, data_dev, keys, frozen, *, model, tx, loss_fn: Callable, batch_size: int,
               crop_pad: int, flip: bool, batch_sharding, teacher: Callable | None = None, schedule=None,
               fixed: frozenset = frozenset()):
  """One SGD step on the batch that `state.step` selects. Pure: (state, ...) -> (state, metrics).

  `frozen` holds what does not train and is never saved: a scheme's teacher
  variables, read by `teacher(frozen, x_BxHxWx3) -> teacher_logits_ExBxC`,
  which runs in this same step on the same augmented batch.
  `fixed` names top-level modules of the model that do not train: the gradient
  is taken with respect to the others only (no backward pass through a fixed
  backbone), and their parameters and BatchNorm statistics are kept as they are.
  """
  data_key, train_key = keys
  idx_B = input_pipeline.batch_indices(data_key, state.step, num_examples=data_dev["labels"].shape[0],
                                       batch_size=batch_size)
  idx_B = jax.lax.with_sharding_constraint(idx_B, batch_sharding)
  aug_key, dropout_key = jax.random.split(jax.random.fold_in(train_key, state.step))
  x_BxHxWx3 = input_pipeline.random_crop_flip(aug_key, data_dev["images"][idx_B], pad=crop_pad, flip=flip)
  x_BxHxWx3 = input_pipeline.normalize(x_BxHxWx3, data_dev["mean"], data_dev["std"])
  labels_B = data_dev["labels"][idx_B]
  teacher_logits = None if teacher is None else jax.lax.stop_gradient(teacher(frozen, x_BxHxWx3))

  def loss_of(trained):
    variables = {"params": {**state.params, **trained}, "batch_stats": state.batch_stats}
    (logits_ExBxC, aux), updates = model.apply(variables, x_BxHxWx3, train=True, mutable=["batch_stats"],
                                               rngs={"dropout": dropout_key})
    loss, metrics = loss_fn(logits_ExBxC, labels_B, teacher_logits, aux, state.step)
    return loss, (updates["batch_stats"], logits_ExBxC, metrics)

  trained = {k: v for k, v in state.params.items() if k not in fixed}
  (loss, (batch_stats, logits_ExBxC, metrics)), grads = jax.value_and_grad(loss_of, has_aux=True)(trained)
  if fixed:  # the optimizer sees the whole tree (its state keeps one layout); what it does to `fixed` is dropped
    grads = {k: grads[k] if k in grads else jax.tree.map(jnp.zeros_like, v) for k, v in state.params.items()}
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if fixed:
    params = {k: state.params[k] if k in fixed else v for k, v in params.items()}
    batch_stats = {k: state.batch_stats[k] if k in fixed else v for k, v in batch_stats.items()}
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
  return scan_chunk(step_fn, num_steps, unroll, out_shardings=(replicated, replicated))


def make_loss_fn(config, num_exits: int, steps_per_epoch: int = 1):
  """The scheme's objective: (logits_ExBxC, labels_B, teacher_logits_ExBxC | None, aux, step) -> (loss, metrics)."""
  weights = config.train.exit_weights
  weights = (1.0,) * num_exits if weights is None else tuple(weights)
  if len(weights) != num_exits:
    raise UserError(f"train.exit_weights has {len(weights)} values; the model has {num_exits} exits")
  scheme = schemes.get(config.scheme)
  section = config.get(scheme.name)  # a scheme's own settings, if it has any
  return lambda logits_ExBxC, labels_B, teacher_logits, aux, step=0: scheme.loss(schemes.LossInputs(
      logits_ExBxC, labels_B, weights, config.train.label_smoothing, section, teacher_logits, aux,
      epoch=step // steps_per_epoch + 1, num_epochs=config.train.epochs))


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


def make_validate(predict_fn, val: data.Split, stats, config, steps_per_epoch: int):
  """(state, step) -> (every exit's accuracy and cross-entropy on the validation split, in inference mode
  (`eejax.history.validation_metrics`), and the logits_ExNxC they came from)."""
  mean_C, std_C = stats

  def validate(state: TrainState, step: int):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits_ExNxC = evaluate.predict(predict_fn, variables, val.images_NxHxWx3, mean_C, std_C,
                                    config.eval.batch_size, "validating", max(10.0, config.log.every_s))
    return history.validation_metrics(logits_ExNxC, val.labels_N, step / steps_per_epoch), logits_ExNxC
  return validate


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint), then writes the report."""
  scheme = schemes.get(config.scheme)
  mesh = sharding.make_mesh()
  replicated, batch_sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  batch_size = config.train.batch_size
  sharding.check_batch_size(batch_size, mesh)
  sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")

  ds = data.from_config(config.data)
  spec = run.spec_of(config, ds, ensemble_teachers=scheme.ensemble_teachers)
  model = spec.build()
  steps_per_epoch = len(ds.train) // batch_size
  if steps_per_epoch == 0:
    raise UserError(f"train.batch_size={batch_size} is larger than the training set ({len(ds.train)} images)")
  total_steps = config.train.epochs * steps_per_epoch
  schedule = make_schedule(config.train, steps_per_epoch)
  tx = make_optimizer(config.train, schedule)
  loss_fn = make_loss_fn(config, model.num_exits, steps_per_epoch)

  # Nothing in the workdir is touched before it is known to hold this run, or none.
  workdirs.check_identity(workdir, workdirs.identity(config, spec.model, ds.num_classes, workdirs.fingerprint(
      ds.train.images_NxHxWx3, ds.train.labels_N)))
  run.check_resume(workdir, config)
  teacher = None if scheme.teacher is None else scheme.teacher(config, model, spec, mesh)
  if teacher is not None:
    run.check_frozen(workdir, "teacher", teacher.source,
                     resuming=bool(checkpoint.steps(os.path.join(workdir, "checkpoints"))))
  if on_main_process():
    run.save_run(workdir, config, spec)

  init_key, data_key, train_key = run_keys(config.seed)
  init_fn = jax.jit(functools.partial(init_state, model, tx, init=config.train.init), static_argnums=1,
                    out_shardings=replicated)
  abstract = checkpoint.as_abstract(jax.eval_shape(init_fn, init_key, ds.image_shape), replicated)
  mngr = checkpoint.manager(workdir, config.checkpoint.max_to_keep)
  state = checkpoint.restore(mngr, abstract, set_aside=True)
  if state is not None:
    say(f"resuming from {workdir} at step {int(state.step)}")
  else:
    state = init_fn(init_key, ds.image_shape)
    if config.init_from:
      variables = run.load_run(config.init_from, mesh).variables
      if jax.tree.map(jnp.shape, variables["params"]) != jax.tree.map(jnp.shape, state.params):
        raise UserError(f"init_from={config.init_from!r} holds a different model from model.name={config.model.name!r} "
                        f"with these settings; start from scratch or match the model config")
      state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
      say(f"initialised from {config.init_from} (parameters and BatchNorm statistics)")
    if scheme.init is not None:
      state = scheme.init(config, state, spec, mesh)

  mean_C, std_C = spec.stats
  data_dev = {"images": sharding.put_replicated(ds.train.images_NxHxWx3, mesh),
              "labels": sharding.put_replicated(ds.train.labels_N, mesh),
              "mean": sharding.put_replicated(mean_C, mesh), "std": sharding.put_replicated(std_C, mesh)}
  keys = (data_key, train_key)
  frozen = None if teacher is None else teacher.variables
  fixed = frozenset(k for k in state.params if scheme.fixed is not None and scheme.fixed(k, model.num_exits))
  step_fn = functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn, batch_size=batch_size,
                              crop_pad=config.data.crop_pad, flip=config.data.flip, batch_sharding=batch_sharded,
                              teacher=None if teacher is None else teacher.forward, schedule=schedule,
                              fixed=fixed)
  chunks = {}  # scan length -> jitted function; at most two lengths (the usual and the last, compiled ahead)
  # The validation split is scored at the first chunk boundary on or after every eval.every_epochs epochs.
  eval_every = max(1, round(config.eval.every_epochs * steps_per_epoch)) if config.eval.every_epochs else 0
  predict_fn = evaluate.make_predict_fn(model, mesh)  # one compilation for validation and the final evaluation
  validate = make_validate(predict_fn, ds.val, spec.stats, config, steps_per_epoch)
  final_val_logits = None  # the last validation's, when it scored the final weights: the report reuses them

  step = int(state.step)
  last_saved = step if mngr.latest_step() is not None else None
  writer = MetricWriter(workdir, tensorboard=config.log.tensorboard)
  progress = Progress(total_steps, batch_size, every_s=config.log.every_s)
  try:  # the metrics and the progress line are closed however the run ends
    per_call = max(1, config.train.steps_per_call)
    say(f"training {config.model.name} ({model.num_exits} exits) on {len(ds.train)} images: {total_steps} steps "
          f"of {batch_size} ({config.train.epochs} epochs) on {mesh.size} {jax.devices()[0].platform} device(s)")
    if warning := schedule_warning(config.train):
      say(warning, sys.stderr)
    pending = None  # (first_step, metrics) of the chunk in flight, pulled after the next is dispatched
    tail = (total_steps - step) % per_call  # the last call's length where it is shorter, compiled ahead (or 0)

    def pull(pending):  # the metrics of a chunk that has run, if any, to the writer and the progress line
      if pending is None:
        return
      first, metrics = pending
      metrics = sharding.to_host(metrics)
      _check_finite(metrics, first, last_saved)
      end = first + len(metrics["loss"])
      writer.write(end, _summary(metrics))
      progress.update(end, float(metrics["loss"][-1]), force=end == total_steps and not eval_every)  # else refreshed

    def validate_now(state, step):  # scores to the writer and the progress line; the logits at the end, else None
      with progress.paused():  # not training time
        scores, val_logits = validate(state, step)
      writer.write(step, scores)
      progress.note = "val " + "/".join(f"{100 * scores[f'val/accuracy_exit{e + 1}']:.2f}"
                                        for e in range(model.num_exits)) + "%"  # every exit's, the last last
      progress.refresh()
      return val_logits if step == total_steps else None

    with signals.StopSignal() as stop:
      # A stop that landed on a validation boundary saved without validating: the resumed run does it first.
      if eval_every and step and collectives.any_process(
          on_main_process() and history.missed(history.read(workdir), step, eval_every, total_steps)):
        final_val_logits = validate_now(state, step)
      while step < total_steps:
        n = min(per_call, total_steps - step)
        if n not in chunks:
          chunks[n] = make_train_chunk(step_fn, n, replicated)
        # The steady-state loop never copies from the host: everything the step reads is on the device.
        with jax.transfer_guard_host_to_device(config.train.transfer_guard):
          state, metrics = chunks[n](state, data_dev, keys, frozen)
        if tail and tail not in chunks:  # while the device runs the chunks before it
          chunks[tail] = compile_ahead(make_train_chunk(step_fn, tail, replicated), state, data_dev, keys, frozen)
        pull(pending)
        pending, step = (step, metrics), step + n
        stop_now = collectives.any_process(stop.signum is not None)  # every process stops at the same step
        crossed = lambda every, step=step, n=n: step // every > (step - n) // every
        if eval_every and not stop_now and (crossed(eval_every) or step == total_steps):
          pull(pending)
          pending = None
          final_val_logits = validate_now(state, step)
        crossed_save = crossed(config.checkpoint.every_steps)
        if stop_now or crossed_save or step == total_steps:
          pull(pending)
          pending = None
          checkpoint.save(mngr, step, state)
          last_saved = step
          # A signal that came during the last save stops the run too, before the evaluation.
          if stop_now or (step == total_steps and collectives.any_process(stop.signum is not None)):
            where = None if stop.signum else f"(sent to another process of the job) at step {step}; checkpoint saved"
            raise signals.Stopped(stop.signum or signal.SIGTERM, step, workdir, where)
    progress.close()  # before the evaluation's lines
    images_per_s = progress.images_per_second(step)

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    macs = exit_macs(model, ds.image_shape)
    t0 = time.perf_counter()
    records = history.read(workdir)
    extra = {"train_images_per_s": images_per_s, "train_steps": total_steps, "history": history.summary(records),
             "history_every_epochs": config.eval.every_epochs, "init_from": config.init_from or None}
    if scheme.report is not None:
      extra.update(scheme.report(state.params))
    report = evaluate.evaluate_and_report(model, variables, ds, macs, config, workdir, mesh, spec.stats, extra=extra,
                                          step=step, predict_fn=predict_fn, val_logits=final_val_logits)
    writer.write(step, {f"test/accuracy_exit{e['exit']}": e["accuracy"] for e in report["exits"]})
    if on_main_process():
      history.plot(records, os.path.join(workdir, "training.png"),
                   f"{config.model.name} ({config.scheme}) on {config.data.source}")
  finally:
    progress.close()
    writer.close()
  say(f"evaluation took {time.perf_counter() - t0:.1f}s; report in {workdir}/report.md")
  return report


