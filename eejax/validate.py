"""Every name in a config checked once, where the config enters (`eejax.main`, `eejax.api.train`), before any data.

The modules below trust what passed here: a wrong name is one `UserError`
listing the valid ones, never a KeyError from deep inside a run.
"""
from eejax import cpm, data, policies, risk, schemes, state
from eejax.errors import UserError, unknown_name
from eejax.models import DTYPES, HEADS
from eejax.models.resnet import check_image_size, get_arch


def check_config(config) -> None:
  data.check_source(config.data.source)
  get_arch(config.model.name)
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
  for name in (*config.eval.policies, *config.eval.fit_policies):
    policies.get(name)
  for name in config.eval.risks:
    if name not in risk.RISKS:
      raise unknown_name("eval.risks entry", name, risk.RISKS)
  if "bts" in config and config.bts.cpm not in cpm.RULES:
    raise unknown_name("bts.cpm", config.bts.cpm, cpm.RULES)
  if config.eval.risk_family not in risk.FAMILIES:
    raise unknown_name("eval.risk_family", config.eval.risk_family, risk.FAMILIES)
  if not 0 < config.eval.risk_delta < 1 or not all(0 < e < 1 for e in config.eval.risk_epsilons):
    raise UserError("eval.risk_delta and every eval.risk_epsilons value must lie strictly between 0 and 1")
  check_numbers(config)


# (key, test, what it must be): numbers a run cannot use, refused before anything is written.
NUMBERS = (("train.batch_size", lambda v: v >= 1, "a positive number of images"),
           ("train.epochs", lambda v: v >= 0, "0 or more"),
           ("train.steps_per_call", lambda v: v >= 1, "1 or more"),
           ("model.width", lambda v: v > 0, "a positive channel multiplier"),
           ("checkpoint.every_steps", lambda v: v >= 1, "1 or more steps"),
           ("checkpoint.max_to_keep", lambda v: v >= 1, "1 or more (a finished run must keep its checkpoint)"),
           ("eval.batch_size", lambda v: v >= 1, "a positive number of images"),
           ("eval.every_epochs", lambda v: v >= 0, "0 (no validation during training) or more epochs"))


def check_numbers(config) -> None:
  for key, ok, what in NUMBERS:
    section, name = key.split(".")
    value = config[section][name]
    if not ok(value):
      raise UserError(f"{key}={value!r} must be {what}")
  if config.get("compile_cache_max_gb", 0.0) < 0:
    raise UserError(f"compile_cache_max_gb={config.compile_cache_max_gb!r} must be 0 (no limit) or more gigabytes")
  if config.model.exit_after is not None and not len(config.model.exit_after):
    raise UserError("model.exit_after=() has no exit; give block numbers, e.g. 3,6,8, or leave it unset "
                    "(an exit after each stage)")
