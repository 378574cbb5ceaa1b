"""A config's names and numbers are checked where it enters, one line each (eejax.validate)."""
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
    ("compile_cache_max_gb", -1.0, "compile_cache_max_gb=-1.0 must be 0 (no limit) or more gigabytes"),
])
def test_a_value_a_run_cannot_use_is_one_line(key, value, message):
  config = cifar10.get_config("smoke")
  *section, name = key.split(".")
  (config[section[0]] if section else config)[name] = value
  with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
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
