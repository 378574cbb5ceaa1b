"""Every config and preset builds, documents its command, and rejects unknown presets."""
import importlib

import pytest

ERDE = ("erde_teacher", "erde", "erde_kd", "erde_student")
SELF = ("mate", "byot", "mate_cpu", "byot_cpu", "joint_cpu")
BTS = ("bts", "bts_cpu")
SDN = ("sdn_cnn", "sdn", "sdn_joint", "ic_only", "sdn_cnn_cpu", "sdn_cpu", "sdn_joint_cpu", "ic_only_cpu")
CONFIGS = {"cifar10": (None, "cpu", "smoke", *ERDE, *SELF, *BTS, *SDN),
           "cifar100": (None, "cpu", *ERDE, *SELF, *BTS, *SDN), "svhn": (None, "cpu", *ERDE, *SELF, *SDN),
           "tiny_imagenet": (None, "mate", "byot"), "cinic10": (None, "cpu", "smoke", *BTS, *SDN)}
SCHEME = {"erde": "erde", "erde_kd": "erde", "mate": "mate", "mate_cpu": "mate", "byot": "byot", "byot_cpu": "byot",
          "bts": "boosted", "bts_cpu": "boosted", "sdn": "sdn", "sdn_cpu": "sdn", "ic_only": "ic_only",
          "ic_only_cpu": "ic_only"}


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


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "cinic10"])
def test_sdn_presets_keep_sdns_recipe_on_every_dataset(name):
  module = importlib.import_module(f"configs.{name}")
  sdn, ic_only, cnn = module.get_config("sdn"), module.get_config("ic_only"), module.get_config("sdn_cnn")
  assert (sdn.model.name, sdn.train.epochs, sdn.train.step_epochs, sdn.train.learning_rate) == (
      "resnet56", 100, (35, 60, 85), 0.1)
  assert sdn.model.exit_after == ic_only.model.exit_after == (4, 8, 12, 16, 20, 24, 27)
  assert cnn.model.exit_after == (27,) and cnn.model.name == "resnet56"
  assert (ic_only.train.optimizer, ic_only.train.learning_rate, ic_only.train.epochs) == ("adam", 1e-3, 25)
  assert sdn.data.source == module.get_config().data.source
