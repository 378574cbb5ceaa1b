"""Every config and preset builds, documents its command, and rejects unknown presets."""
import importlib

import pytest

CONFIGS = {"cifar10": (None, "cpu", "smoke"), "cifar100": (None, "cpu"), "svhn": (None, "cpu")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_presets_build_and_document_a_command(name):
  module = importlib.import_module(f"configs.{name}")
  assert "python -m eejax.main --config configs/" in module.__doc__
  for preset in CONFIGS[name]:
    config = module.get_config(preset)
    assert config.scheme == "joint"
    assert config.train.batch_size % 2 == 0
  with pytest.raises(ValueError, match="unknown preset"):
    module.get_config("nope")
