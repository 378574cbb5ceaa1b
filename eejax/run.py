"""The workdir format, in one place: what a run saves and how any later step loads it.

A workdir holds config.json (the settings that made it), run.json (a
`RunSpec`: the model's settings, the classes (their number and names) and
image shape, and the channel statistics the images are normalised with), checkpoints/ (orbax) and, once
evaluated, report.json, logits.npz and thresholds.json. `load_run` rebuilds the
model from run.json alone, so serving, calibrating or exporting a finished run
never decodes its training set. A workdir written before run.json held the
model and statistics still loads: the statistics are recomputed once from its
training data, with a line saying so, and saved.
"""
import dataclasses
import functools
import hashlib
import os

import jax
import ml_collections
import numpy as np
import optax

from eejax import checkpoint, data, input_pipeline, sharding, state, workdirs
from eejax.errors import UserError
from eejax.models import MultiExitNet
from eejax.models import resnet
from eejax.models.multi_exit import DTYPES
from eejax.writers import on_main_process, say

# Config keys added after the first runs were saved: an older config.json gets them with their neutral value.
LATER_KEYS = {"model.head_dropout": 0.0, "model.exit_grad_scale": 1.0, "train.grad_clip": 0.0,
              "train.transfer_guard": "disallow", "data.test_split": "test",
              "data.mirror": "", "eval.every_epochs": 0.0, "train.init": "flax",
              "train.optimizer": "sgd", "train.weight_decay_on": "kernels"}


# What may differ when a run resumes besides how the job runs (workdirs.RUNS_ANY_WAY): how long it trains (a line
# says so), where it starts when it has no checkpoint, and how it is evaluated. Never how it trains.
RESUMES_WITH_ANY = workdirs.RUNS_ANY_WAY + ("train.epochs", "init_from", "eval.")


def check_resume(workdir: str, config) -> None:
  """A run resumes only with the settings it was started with that shape its training (BTS-EE's runs likewise):
  another batch size, schedule, optimizer, augmentation or loss would train the rest differently from its start,
  and config.json would then record settings its first steps never had. More train.epochs go on to that length,
  with a line: the schedule is recomputed for it from the saved step; fewer are refused (a run past the new end
  would be reported as the shorter run). A workdir without checkpoints starts over."""
  saved = os.path.join(workdir, "config.json")
  if not (checkpoint.steps(os.path.join(workdir, "checkpoints")) and os.path.exists(saved)):
    return
  before = _with_later_keys(workdirs.read_json(saved))
  what = setting_differences(before, config, RESUMES_WITH_ANY)
  if config.train.epochs < before.train.epochs:
    what = "; ".join(filter(None, [f"train.epochs: {before.train.epochs} there, {config.train.epochs} here, and a "
                                   f"run only grows longer", what]))
  if what:
    raise UserError(f"{workdir} holds a run started with other training settings ({what}). Nothing in it was "
                    f"changed: resume it with the settings in its config.json, or train on from its weights with "
                    f"these in a new --workdir, with --config.init_from={workdir}")
  if before.train.epochs != config.train.epochs:
    say(f"train.epochs {before.train.epochs} -> {config.train.epochs}: this run goes on to {config.train.epochs} "
        f"epochs from its last checkpoint, its learning rate following the schedule of that length from there")


def setting_differences(before, config, free: tuple = workdirs.RUNS_ANY_WAY) -> str:
  """`workdirs.differences` of two configs on the settings that shape what `config`'s scheme trains and reports,
  the prefixes in `free` aside."""
  return workdirs.differences(workdirs.as_tree(before), workdirs.as_tree(config),
                              lambda key: workdirs.shapes_result(key, config.scheme, free))


def model_settings(model_cfg, ensemble_teachers: bool = False) -> dict:
  """MultiExitNet's keyword arguments (less num_classes) from a config's `model` section, as JSON values."""
  return {"arch": model_cfg.name, "width": float(model_cfg.width),
          "exit_after": None if model_cfg.exit_after is None else [int(b) for b in model_cfg.exit_after],
          "head": model_cfg.head, "head_width": int(model_cfg.head_width),
          "head_dropout": float(model_cfg.head_dropout), "exit_grad_scale": float(model_cfg.exit_grad_scale),
          "ensemble_teachers": bool(ensemble_teachers), "dtype": model_cfg.dtype}


def make_model(settings: dict, num_classes: int) -> MultiExitNet:
  exit_after = settings["exit_after"]
  return MultiExitNet(num_classes=num_classes, **{**settings, "dtype": DTYPES[settings["dtype"]],
                                                  "exit_after": None if exit_after is None else tuple(exit_after)})


def build_model(model_cfg, num_classes: int, ensemble_teachers: bool = False) -> MultiExitNet:
  """The MultiExitNet of a config's `model` section (names already checked by `eejax.validate`)."""
  return make_model(model_settings(model_cfg, ensemble_teachers), num_classes)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What serving a run needs besides its weights: the model, the classes and image shape, the statistics."""
  model: dict  # `model_settings`
  num_classes: int
  image_shape: tuple
  mean_C: tuple
  std_C: tuple
  class_names: tuple = ()  # the label of each class index; empty in runs saved before they were recorded

  @classmethod
  def of(cls, model: dict, num_classes: int, image_shape, mean_C, std_C, class_names=()) -> "RunSpec":
    return cls(model, int(num_classes), tuple(int(d) for d in image_shape),
               tuple(float(m) for m in np.asarray(mean_C, np.float32)),
               tuple(float(s) for s in np.asarray(std_C, np.float32)), tuple(str(c) for c in class_names))

  def build(self) -> MultiExitNet:
    return make_model(self.model, self.num_classes)

  @property
  def stats(self):
    """(mean_C, std_C) float32: `input_pipeline.normalize`'s arguments."""
    return np.asarray(self.mean_C, np.float32), np.asarray(self.std_C, np.float32)

  def check_matches(self, num_classes: int, image_shape, what: str, workdir: str, hint: str = "") -> None:
    """One line when another run (a teacher, a backbone) saw other classes or image shapes than this data."""
    if self.num_classes != num_classes or tuple(self.image_shape) != tuple(image_shape):
      raise UserError(f"the {what} in {workdir} was trained on {self.num_classes} classes of "
                      f"{list(self.image_shape)} images; {hint or 'this run has'} {num_classes} classes of "
                      f"{list(image_shape)}")


@dataclasses.dataclass
class Run:
  """A loaded workdir: its config, model, variables (on the device mesh) and spec."""
  workdir: str
  config: ml_collections.ConfigDict
  model: MultiExitNet
  variables: dict
  spec: RunSpec
  step: int | None = None  # the checkpoint step the variables come from

  def unfinished(self) -> str | None:
    """Why the variables are not those the run finished with (its report.json is of another step, or missing: a
    run stopped part-way, or still training in another job), or None."""
    path = os.path.join(self.workdir, "report.json")
    report = workdirs.read_json(path) if os.path.exists(path) else None
    reported = report.get("step", self.step) if isinstance(report, dict) else None  # older reports: no step
    if reported == self.step:
      return None
    return (f"its latest checkpoint is step {self.step}, "
            + ("and it has no report" if reported is None else f"its report of step {reported}"))

  def use_data(self, source: str) -> None:
    """Reads its images from `source`, where its dataset moved since it trained; its normalisation statistics stay
    its own (run.json)."""
    data.check_source(source)
    self.config.data.source = source

  def check_finished(self, role: str) -> None:
    """A teacher or backbone is a finished run: one stopped part-way, or still training in another job, would
    otherwise teach from half-trained weights without a word."""
    why = self.unfinished()
    if why:
      raise UserError(f"the {role} in {self.workdir} has not finished training: {why}; run its command to the end "
                      "first (or wait for the job training it)")


def weights_sha256(variables) -> str:
  """SHA-256 of a run's weights (every array with its path, dtype and shape): the same for a copy anywhere."""
  h = hashlib.sha256()
  for path, a in jax.tree_util.tree_flatten_with_path(sharding.to_host(variables))[0]:
    h.update(f"{jax.tree_util.keystr(path)}{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def check_frozen(workdir: str, role: str, source: Run, resuming: bool) -> None:
  """A run that learns from a frozen one (an ERDE teacher, a BTS-EE backbone) keeps it for its whole life.

  WORKDIR/ROLE.json records the frozen run's weights when the run starts (or, for a run begun before it was
  recorded, when it resumes); resuming with other weights, say a teacher trained again at the same path, would
  train the rest on another network's outputs and report the mix as one run. A moved copy is the same run."""
  path = os.path.join(workdir, f"{role}.json")
  mine = {"workdir": os.path.abspath(source.workdir), "step": source.step,
          "weights_sha256": weights_sha256(source.variables)}
  theirs = workdirs.read_json(path) if resuming and os.path.exists(path) else None
  if isinstance(theirs, dict) and theirs.get("weights_sha256") != mine["weights_sha256"]:
    raise UserError(f"{workdir} was trained so far with the {role} in {theirs.get('workdir')} (step "
                    f"{theirs.get('step')}), and the {role} in {source.workdir} (step {source.step}) holds other "
                    f"weights. Nothing in it was changed: resume it with its own {role} ({role}.json), or train "
                    f"with this one in a new --workdir")
  if on_main_process() and not isinstance(theirs, dict):
    os.makedirs(workdir, exist_ok=True)
    workdirs.write_json(path, mine)


def spec_of(config, ds: data.Dataset, ensemble_teachers: bool = False) -> RunSpec:
  """The spec of a new run on `ds`: the channel statistics come from its training images, once."""
  resnet.check_image_size(config.model.name, ds.image_shape[0])
  mean_C, std_C = input_pipeline.channel_stats(ds.train.images_NxHxWx3)
  return RunSpec.of(model_settings(config.model, ensemble_teachers), ds.num_classes, ds.image_shape, mean_C, std_C,
                    ds.class_names)


def save_run(workdir: str, config, spec: RunSpec) -> None:
  """config.json and run.json, written when a run starts (process 0)."""
  workdirs.save_config(workdir, config)
  _write_spec(workdir, spec)


def save_model(workdir: str, config, spec: RunSpec, variables) -> None:
  """A finished, loadable run of `variables` that was not trained here (BTS-EE's branch models).

  Every process of a multi-process job calls it with the same variables; process 0 writes the files.
  """
  if on_main_process():
    save_run(workdir, config, spec)
  tx = state.make_optimizer(config.train, optax.constant_schedule(0.0))
  mesh = sharding.make_mesh()
  saved = jax.tree.map(lambda a: sharding.put_replicated(a, mesh), sharding.to_host(state.state_of(variables, tx)))
  checkpoint.save(checkpoint.manager(workdir, 1), 0, saved)


def _write_spec(workdir: str, spec: RunSpec) -> None:
  workdirs.write_json(os.path.join(workdir, "run.json"), dataclasses.asdict(spec))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  if not isinstance(workdir, (str, os.PathLike)):
    raise UserError(f"workdir={workdir!r}: give the path of a run's folder")
  path = os.path.join(workdir, "config.json")
  if not (os.path.exists(path) and os.path.exists(os.path.join(workdir, "run.json"))):
    raise workdirs.not_a_run(workdir)
  return _with_later_keys(workdirs.read_json(path))


def _with_later_keys(saved: dict) -> ml_collections.ConfigDict:
  """A saved config.json as a ConfigDict, the keys added since it was written given their neutral value."""
  config = ml_collections.ConfigDict(saved)
  for key, value in LATER_KEYS.items():
    section, name = key.split(".")
    if section in config and name not in config[section]:
      config[section][name] = value
  return config


def load_spec(workdir: str, config=None) -> RunSpec:
  """run.json as a RunSpec; an older one (classes and shape only) is completed once and saved."""
  raw = workdirs.read_json(os.path.join(workdir, "run.json"))
  if "model" in raw and "mean_C" in raw:
    return RunSpec.of(raw["model"], raw["num_classes"], raw["image_shape"], raw["mean_C"], raw["std_C"],
                      raw.get("class_names", ()))
  config = config or load_config(workdir)
  print(f"{workdir}: run.json has no channel statistics (an older run); computing them once from its training "
        f"images ({config.data.source}) and saving them")
  ds = data.from_config(config.data)
  mean_C, std_C = input_pipeline.channel_stats(ds.train.images_NxHxWx3)
  # Older runs stored no model settings either: scheme=mate was the one that built the ensemble teachers.
  spec = RunSpec.of(model_settings(config.model, config.get("scheme") == "mate"), raw["num_classes"],
                    raw["image_shape"], mean_C, std_C, ds.class_names)
  if on_main_process():
    _write_spec(workdir, spec)
  return spec


def load_run(workdir: str, mesh=None) -> Run:
  """The run in `workdir` from its latest checkpoint, its variables replicated over `mesh` (default: all devices)."""
  config = load_config(workdir)
  spec = load_spec(workdir, config)
  model = spec.build()
  tx = state.make_optimizer(config.train, optax.constant_schedule(0.0))
  mesh = mesh or sharding.make_mesh()
  abstract = jax.eval_shape(functools.partial(state.init_state, model, tx, image_shape=spec.image_shape),
                            jax.random.key(0))
  restored = checkpoint.restore_from_workdir(workdir, checkpoint.as_abstract(abstract, sharding.replicated(mesh)))
  return Run(workdir, config, model, {"params": restored.params, "batch_stats": restored.batch_stats}, spec,
             int(sharding.to_host(restored.step)))
