"""Every name and number in a config checked once, where the config enters (`eejax.main`,
`eejax.api.train_and_evaluate`), before any data.

The modules below trust what passed here: a wrong name is one `UserError`
listing the valid ones, a number out of range one saying what it must be,
never a KeyError from deep inside a run or a run that trains on nonsense.
"""
import math

from eejax import cpm, data, losses, policies, risk, schemes, state
from eejax.errors import UserError, is_number, unknown_name
from eejax.models import DTYPES, HEADS
from eejax.models.resnet import check_image_size, exit_points, get_arch


def check_config(config) -> None:
  data.check_source(config.data.source)
  arch = get_arch(config.model.name)
  check_numbers(config)
  if config.model.exit_after is not None:
    exit_points(arch, config.model.exit_after)  # block numbers the model has
  if config.data.image_size is not None:
    check_image_size(config.model.name, config.data.image_size)
  if config.model.head not in HEADS:
    raise unknown_name("model.head", config.model.head, HEADS)
  if config.model.dtype not in DTYPES:
    raise unknown_name("model.dtype", config.model.dtype, DTYPES)
  scheme = schemes.get(config.scheme)
  if scheme.has_section and scheme.name not in config:
    raise UserError(f"scheme={scheme.name} reads a config.{scheme.name} section, which this config lacks")
  if config.train.schedule not in state.SCHEDULES:
    raise unknown_name("train.schedule", config.train.schedule, state.SCHEDULES)
  if config.train.optimizer not in state.OPTIMIZERS:
    raise unknown_name("train.optimizer", config.train.optimizer, state.OPTIMIZERS)
  if config.train.init not in state.INITS:
    raise unknown_name("train.init", config.train.init, state.INITS)
  if config.train.weight_decay_on not in state.DECAY_MASKS:
    raise unknown_name("train.weight_decay_on", config.train.weight_decay_on, state.DECAY_MASKS)
  for key, example in (("policies", "max_prob,entropy"), ("budgets", "0.25,0.5,0.75")):
    if not len(config.eval[key]):  # the report's tables would be empty, and no threshold fitted for a budget
      raise UserError(f"eval.{key}=() leaves the report with nothing to show: give one or more, e.g. "
                      f"--config.eval.{key}={example}")
  for name in (*config.eval.policies, *config.eval.fit_policies):
    policies.get(name)
  for name in config.eval.risks:
    if name not in risk.RISKS:
      raise unknown_name("eval.risks entry", name, risk.RISKS)
  if "erde" in config and config.erde.reference not in losses.TEACHER_REFERENCES:
    raise unknown_name("erde.reference", config.erde.reference, losses.TEACHER_REFERENCES)
  if "bts" in config and config.bts.cpm not in cpm.RULES:
    raise unknown_name("bts.cpm", config.bts.cpm, cpm.RULES)
  if config.eval.risk_family not in risk.FAMILIES:
    raise unknown_name("eval.risk_family", config.eval.risk_family, risk.FAMILIES)
  if not 0 < config.eval.risk_delta < 1 or not all(0 < e < 1 for e in config.eval.risk_epsilons):
    raise UserError("eval.risk_delta and every eval.risk_epsilons value must lie strictly between 0 and 1")


at_least_0, at_least_1 = (lambda v: v >= 0), (lambda v: v >= 1)
positive, below_1 = (lambda v: v > 0), (lambda v: 0 <= v < 1)
# (key, test, what it must be): numbers a run cannot use, refused before anything is written. A sequence's entries
# are tested one by one; an unset value (None) and a section the config lacks are not tested.
NUMBERS = (("train.batch_size", at_least_1, "a positive number of images"),
           ("train.epochs", at_least_0, "0 or more"),
           ("train.steps_per_call", at_least_1, "1 or more"),
           ("train.learning_rate", at_least_0, "0 or more (the peak learning rate)"),
           ("train.warmup_epochs", at_least_0, "0 (no warm-up) or more epochs"),
           ("train.step_epochs", at_least_0, "epochs, each 0 or more"),
           ("train.step_factor", positive, "a positive factor (0.1: the learning rate divided by 10)"),
           ("train.momentum", below_1, "at least 0 and below 1"),
           ("train.weight_decay", at_least_0, "0 (none) or more"),
           ("train.label_smoothing", below_1, "at least 0 and below 1"),
           ("train.grad_clip", at_least_0, "0 (off) or a positive global norm"),
           ("train.exit_weights", at_least_0, "loss weights, each 0 or more"),
           ("model.width", positive, "a positive channel multiplier"),
           ("model.head_width", at_least_1, "1 or more channels"),
           ("model.head_dropout", below_1, "a rate at least 0 and below 1"),
           ("model.exit_grad_scale", at_least_0, "0 (heads only) or more (1: joint training)"),
           ("data.val_size", at_least_1, "1 or more training images held out for validation"),
           ("data.max_images", at_least_0, "0 (every image) or more images per split"),
           ("data.image_size", at_least_1, "a positive number of pixels"),
           ("data.val_seed", at_least_0, "0 or more (numpy's generator takes no negative seed)"),
           ("data.crop_pad", at_least_0, "0 (no random crop) or more pixels"),
           ("checkpoint.every_steps", at_least_1, "1 or more steps"),
           ("checkpoint.max_to_keep", at_least_1, "1 or more (a finished run must keep its checkpoint)"),
           ("eval.batch_size", at_least_1, "a positive number of images"),
           ("eval.every_epochs", at_least_0, "0 (no validation during training) or more epochs"),
           ("eval.num_thresholds", at_least_1, "1 or more points on each curve"),
           ("eval.budgets", lambda v: 0 < v <= 1, "fractions of the full network's MACs, each above 0 and at most 1"),
           ("log.every_s", at_least_0, "0 (every chunk) or more seconds"),
           ("erde.temperature", positive, "a positive temperature"),
           ("erde.kd_weight", at_least_0, "0 (no distillation) or more"),
           ("erde.entropy_weight", at_least_0, "0 (no entropy term) or more"),
           ("mate.temperature", positive, "a positive temperature"),
           ("mate.primary_weight", lambda v: 0 <= v <= 1, "a share between 0 and 1"),
           ("mate.kd_weight", at_least_0, "0 (no distillation) or more"),
           ("byot.temperature", positive, "a positive temperature"),
           ("byot.kd_weight", at_least_0, "0 (no distillation) or more"),
           ("bts.head_width", at_least_1, "1 or more filters"),
           ("bts.margins", below_1, "fractions of precision, each at least 0 and below 1"),
           ("bts.epochs", positive, "a positive number of epochs per branch"),
           ("bts.batch_size", at_least_1, "a positive number of images"),
           ("bts.learning_rate", at_least_0, "0 or more"),
           ("bts.weight_decay", at_least_0, "0 (none) or more"),
           ("bts.distill_weight", at_least_0, "0 (labels only) or more"),
           ("bts.distill_temperature", positive, "a positive temperature"),
           ("bts.min_support", at_least_0, "0 or more validation images"),
           ("bts.num_thresholds", lambda v: v >= 2, "2 or more candidate thresholds"),
           ("bts.steps_per_call", at_least_1, "1 or more"),
           ("sdn.start_weight", at_least_0, "0 or more"),
           ("sdn.max_weights", at_least_0, "weights, each 0 or more"),
           ("compile_cache_max_gb", at_least_0, "0 (no limit) or more gigabytes"),
           # jax's keys take the seed modulo 2**32: seed 2**32 + 5 would silently repeat seed 5's run.
           ("seed", lambda v: 0 <= v < 2 ** 32 and v == int(v), f"a whole number from 0 to {2 ** 32 - 1}"))


def check_numbers(config) -> None:
  for key, ok, what in NUMBERS:
    *section, name = key.split(".")  # "section.name", or "name" at the config's top
    value = (config[section[0]].get(name) if section[0] in config else None) if section else config.get(name)
    if value is not None and not all(is_number(v) and ok(v) for v in _entries(value)):
      raise UserError(f"{key}={_shown(value)} must be {what}")
  if config.train.epochs == 0 and not config.get("init_from"):
    raise UserError("train.epochs=0 trains nothing, and the report would score a network that never learnt: give 1 "
                    "or more epochs, or evaluate another run's weights with --config.init_from=WORKDIR")
  if config.model.exit_after is not None and not len(config.model.exit_after):
    raise UserError("model.exit_after=() has no exit; give block numbers, e.g. 3,6,8, or leave it unset "
                    "(an exit after each stage)")
  # Block numbers: 3.5 was read as block 3, True as block 1, and 3,3 as one exit, without a word.
  for key, value, distinct in (("model.exit_after", config.model.exit_after, True),
                               ("bts.positions", config.bts.positions if "bts" in config else None, False)):
    entries = _entries(value) if value is not None else ()
    whole = all(is_number(b) and math.isfinite(b) and b >= 1 and b == int(b) for b in entries)
    if not whole or (distinct and len(set(entries)) < len(entries)):
      raise UserError(f"{key}={_shown(value)} must be distinct whole block numbers, e.g. 3,6,8")
  weights = config.train.exit_weights
  if weights is not None and len(weights) and not any(weights):
    raise UserError(f"train.exit_weights={_shown(weights)} gives every exit weight 0, so nothing would learn")


def _entries(value) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _shown(value) -> str:
  return repr(tuple(value)) if isinstance(value, list) else repr(value)
