"""A config's names and numbers are checked where it enters, one line each (eejax.validate)."""
import math
import re

import numpy as np
import pytest

from configs import cifar10
from eejax import validate
from eejax.errors import UserError


@pytest.mark.parametrize("key,value,message", [
    ("train.batch_size", 0, "train.batch_size=0 must be a positive number of images"),
    ("train.batch_size", -16, "train.batch_size=-16 must be"),
    ("train.epochs", -1, "train.epochs=-1 must be 0 or more"),
    ("model.width", 0.0, "model.width=0.0 must be a positive channel multiplier"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps=0 must be 1 or more steps"),
    ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep=0 must be 1 or more"),
    ("eval.every_epochs", -1.0, "eval.every_epochs=-1.0 must be 0 (no validation during training) or more"),
    ("model.exit_after", (), "model.exit_after=() has no exit"),
    ("train.init", "torch", "unknown train.init 'torch'; valid: flax, pytorch"),
    ("data.source", "cifar11", "data.source='cifar11': expected one of cifar10"),
    ("data.source", "folder:", "data.source='folder:': expected one of"),
    ("train.learning_rate", -0.1, "train.learning_rate=-0.1 must be 0 or more (the peak learning rate)"),
    ("train.learning_rate", math.nan, "train.learning_rate=nan must be 0 or more"),
    ("train.warmup_epochs", -1.0, "train.warmup_epochs=-1.0 must be 0 (no warm-up) or more epochs"),
    ("train.step_epochs", (10, -1), "train.step_epochs=(10, -1) must be epochs, each 0 or more"),
    ("train.step_factor", 0.0, "train.step_factor=0.0 must be a positive factor"),
    ("train.momentum", 1.0, "train.momentum=1.0 must be at least 0 and below 1"),
    ("train.momentum", -0.1, "train.momentum=-0.1 must be at least 0 and below 1"),
    ("train.weight_decay", -5e-4, "train.weight_decay=-0.0005 must be 0 (none) or more"),
    ("train.label_smoothing", 1.0, "train.label_smoothing=1.0 must be at least 0 and below 1"),
    ("train.grad_clip", -1.0, "train.grad_clip=-1.0 must be 0 (off) or a positive global norm"),
    ("train.exit_weights", (1.0, -1.0, 1.0), "train.exit_weights=(1.0, -1.0, 1.0) must be loss weights, each 0"),
    ("train.exit_weights", (0.0, 0.0, 0.0), "train.exit_weights=(0.0, 0.0, 0.0) gives every exit weight 0"),
    ("model.head_width", 0, "model.head_width=0 must be 1 or more channels"),
    ("model.head_dropout", 1.0, "model.head_dropout=1.0 must be a rate at least 0 and below 1"),
    ("model.exit_grad_scale", -1.0, "model.exit_grad_scale=-1.0 must be 0 (heads only) or more"),
    ("data.max_images", -5, "data.max_images=-5 must be 0 (every image) or more images per split"),
    ("data.image_size", 0, "data.image_size=0 must be a positive number of pixels"),
    ("data.val_seed", -1, "data.val_seed=-1 must be 0 or more"),
    ("data.crop_pad", -1, "data.crop_pad=-1 must be 0 (no random crop) or more pixels"),
    ("eval.num_thresholds", 0, "eval.num_thresholds=0 must be 1 or more points on each curve"),
    ("eval.budgets", (0.5, 1.5), "eval.budgets=(0.5, 1.5) must be fractions of the full network's MACs, each above 0"),
    ("eval.budgets", (0.0,), "eval.budgets=(0.0,) must be fractions"),
    ("log.every_s", -1.0, "log.every_s=-1.0 must be 0 (every chunk) or more seconds"),
    ("erde.temperature", 0.0, "erde.temperature=0.0 must be a positive temperature"),
    ("erde.entropy_weight", -0.1, "erde.entropy_weight=-0.1 must be 0 (no entropy term) or more"),
    ("train.weight_decay_on", "bn", "unknown train.weight_decay_on 'bn'; valid: all, kernels"),
    ("erde.reference", "best", "unknown erde.reference 'best'; valid: final, own"),
    ("mate.primary_weight", 1.5, "mate.primary_weight=1.5 must be a share between 0 and 1"),
    ("byot.temperature", -3.0, "byot.temperature=-3.0 must be a positive temperature"),
    ("bts.margins", (0.0, 1.0), "bts.margins=(0.0, 1.0) must be fractions of precision, each at least 0 and below 1"),
    ("bts.epochs", 0.0, "bts.epochs=0.0 must be a positive number of epochs per branch"),
    ("bts.num_thresholds", 1, "bts.num_thresholds=1 must be 2 or more candidate thresholds"),
    ("bts.distill_temperature", 0.0, "bts.distill_temperature=0.0 must be a positive temperature"),
    ("sdn.max_weights", (0.5, -0.1), "sdn.max_weights=(0.5, -0.1) must be weights, each 0 or more"),
    ("compile_cache_max_gb", -1.0, "compile_cache_max_gb=-1.0 must be 0 (no limit) or more gigabytes"),
    ("compile_cache_max_gb", float("nan"), "compile_cache_max_gb=nan must be 0 (no limit) or more gigabytes"),
    ("eval.budgets", (), "eval.budgets=() leaves the report with nothing to show: give one or more, e.g. "
                         "--config.eval.budgets=0.25,0.5,0.75"),  # once a report of empty tables
    ("eval.policies", (), "eval.policies=() leaves the report with nothing to show"),
    ("data.val_size", 0, "data.val_size=0 must be 1 or more training images held out"),  # once after decoding
    ("seed", -1, "seed=-1 must be a whole number from 0 to 4294967295"),
    ("seed", 2 ** 32 + 5, "seed=4294967301 must be a whole number from 0 to 4294967295"),  # jax's key: seed 5's
    # Block numbers: 3.5 was block 3, True block 1, 2,2,3 two exits, and "3,x" an internal error after decoding.
    ("model.exit_after", (3.5,), "model.exit_after=(3.5,) must be distinct whole block numbers, e.g. 3,6,8"),
    ("model.exit_after", (True,), "model.exit_after=(True,) must be distinct whole block numbers"),
    ("model.exit_after", (2, 2, 3), "model.exit_after=(2, 2, 3) must be distinct whole block numbers"),
    ("model.exit_after", ("3,x",), "model.exit_after=('3,x',) must be distinct whole block numbers"),
    ("model.exit_after", (1, float("inf")), "model.exit_after=(1, inf) must be distinct whole block numbers"),
    ("model.exit_after", (2, 9), "model.exit_after=[2, 9] must hold block numbers in 1..3"),  # resnet8: 3 blocks
    ("bts.positions", (1.5,), "bts.positions=(1.5,) must be distinct whole block numbers"),
])
def test_a_value_a_run_cannot_use_is_one_line(key, value, message):
  config = cifar10.get_config("smoke")
  *section, name = key.split(".")
  (config[section[0]] if section else config)[name] = value
  with pytest.raises(UserError, match="^" + re.escape(message)):
    validate.check_config(config)


def test_zero_epochs_is_refused_unless_it_evaluates_another_runs_weights():
  config = cifar10.get_config("smoke")
  config.train.epochs = 0
  with pytest.raises(UserError, match=r"^train.epochs=0 trains nothing, .* --config.init_from=WORKDIR$"):
    validate.check_config(config)
  config.init_from = "/runs/a"
  validate.check_config(config)


def test_every_preset_passes():
  for preset in (None, "cpu", "smoke", *cifar10.PRESETS):
    validate.check_config(cifar10.get_config(preset))


def test_images_too_small_for_a_models_max_pools_are_one_line():
  config = cifar10.get_config("smoke")
  config.model.name, config.data.image_size = "vgg16", 24  # five 2x2 max-pools: 24 -> 12, 6, 3, 1, 0
  with pytest.raises(UserError, match=r"^model.name=vgg16 halves the image 5 times .* at least 32x32 pixels, and "
                                      r"these are 24x24; set data.image_size=32 \(or more\), or choose another"):
    validate.check_config(config)
  config.data.image_size = 32
  validate.check_config(config)
  config.model.name, config.data.image_size = "resnet18", 4  # strided convolutions never reach zero
  validate.check_config(config)


def test_every_number_checked_is_a_setting_of_the_config():
  """A misspelt key in validate.NUMBERS would never be checked (a missing key reads as unset)."""
  config = cifar10.get_config()
  for key, _, _ in validate.NUMBERS:
    *section, name = key.split(".")
    assert name in (config[section[0]] if section else config), key


def test_the_edges_of_every_range_pass_and_numpys_numbers_are_numbers():
  config = cifar10.get_config("smoke")
  config.train.update(learning_rate=0.0, momentum=0.0, weight_decay=0.0, label_smoothing=0.0, warmup_epochs=0.0,
                      grad_clip=0.0, exit_weights=(0.0, 0.0, 1.0), step_epochs=(0, 1))
  config.model.update(head_dropout=0.0, exit_grad_scale=0.0)
  config.data.update(max_images=0, crop_pad=0, image_size=1)
  config.eval.update(budgets=(1.0,), num_thresholds=1, every_epochs=0.0)
  config.mate.primary_weight, config.bts.margins, config.bts.num_thresholds = 1.0, (0.0,), 2
  config.seed = 2 ** 32 - 1
  validate.check_config(config)
  config.eval.budgets = (np.float32(0.5), np.float64(1.0))  # a sequence's entries are not cast to float
  validate.check_config(config)
  config.eval.budgets = (np.float32(0.5), np.float32(1.5))
  with pytest.raises(UserError, match="^eval.budgets=.* must be fractions"):
    validate.check_config(config)


def test_a_config_without_a_schemes_section_is_not_checked_there():
  config = cifar10.get_config("smoke")
  del config["bts"]
  config.erde.temperature = 2.0
  validate.check_config(config)
