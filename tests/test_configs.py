"""Every config and preset builds, documents its command, and rejects unknown presets."""
import importlib

import pytest

ERDE = ("erde_teacher", "erde", "erde_kd", "erde_student")
SELF = ("mate", "byot", "mate_cpu", "byot_cpu", "joint_cpu")
BTS = ("bts", "bts_cpu")
CONFIGS = {"cifar10": (None, "cpu", "smoke", *ERDE, *SELF, *BTS), "cifar100": (None, "cpu", *ERDE, *SELF, *BTS),
           "svhn": (None, "cpu", *ERDE, *SELF), "tiny_imagenet": (None, "mate", "byot"),
           "cinic10": (None, "cpu", "smoke", *BTS)}
SCHEME = {"erde": "erde", "erde_kd": "erde", "mate": "mate", "mate_cpu": "mate", "byot": "byot", "byot_cpu": "byot",
          "bts": "boosted", "bts_cpu": "boosted"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_presets_build_and_document_a_command(name):
  module = importlib.import_module(f"configs.{name}")
  assert "python -m eejax.main --config configs/" in module.__doc__
  for preset in CONFIGS[name]:
    config = module.get_config(preset)
    assert config.scheme == SCHEME.get(preset, "joint")
    if preset and preset.endswith("_cpu") and preset not in BTS:  # BTS-EE takes its model from the backbone run
      assert config.model.name == module.get_config("cpu").model.name
    if preset == "erde_kd":
      assert config.erde.entropy_weight == 0 and not config.erde.drop_kd_on_errors
    assert config.train.batch_size % 2 == 0
  with pytest.raises(ValueError, match="unknown preset"):
    module.get_config("nope")


def test_cinic10_reads_its_own_validation_folder_and_bts_cpu_fits_resnet8():
  from configs import cifar10, cinic10  # pylint: disable=g-import-not-at-top
  assert cinic10.get_config("bts").data.source == "cinic10"  # the tarball's train/ valid/ test/
  assert max(cifar10.get_config("bts_cpu").bts.positions) < 3  # ResNet-8 has 3 blocks; the last feeds the classifier
