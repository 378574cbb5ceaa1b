"""Schemes as data: the built-ins are registered, and a new scheme is one declaration plus one config section."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cifar10
from eejax import losses, schemes, train
from eejax.errors import UserError


def test_the_built_in_schemes_are_registered_with_what_they_need():
  assert set(schemes.SCHEMES) >= {"joint", "erde", "mate", "byot", "boosted"}
  assert schemes.get("mate").ensemble_teachers and schemes.get("mate").report is not None
  assert schemes.get("erde").teacher is not None and schemes.get("boosted").job is not None
  with pytest.raises(UserError, match="unknown scheme 'jointt'"):
    schemes.get("jointt")


def per_exit_smoothing(b):
  """A toy scheme: exit e trains with its own label smoothing, config.ls_exits.smoothing[e]."""
  ce_E = jnp.stack([losses.cross_entropy(b.logits_ExBxC[e:e + 1], b.labels_B, s)[0].mean()
                    for e, s in enumerate(b.section.smoothing)])
  return jnp.dot(jnp.asarray(b.weights_E, jnp.float32), ce_E), {"smoothed_ce_E": ce_E}


def test_a_new_scheme_is_one_declaration_and_one_config_section(tiny_tree, tmp_path):
  schemes.register(schemes.Scheme("ls_exits", loss=per_exit_smoothing, has_section=True))
  try:
    config = cifar10.get_config("smoke")
    config.scheme = "ls_exits"
    config.ls_exits = ml_collections.ConfigDict({"smoothing": (0.0, 0.1, 0.2)})
    config.data.update(source=f"folder:{tiny_tree}", cache_dir="", val_size=8)
    config.eval.real_inference = False
    # The loss the loop builds is the toy's: exit 1 unsmoothed, the others smoothed as configured.
    rng = np.random.default_rng(0)
    logits, labels = jnp.asarray(rng.normal(size=(3, 8, 3)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8))
    loss, metrics = train.make_loss_fn(config, 3)(logits, labels, None, {})
    want = [np.mean(losses.cross_entropy(logits[e:e + 1], labels, s)) for e, s in enumerate((0.0, 0.1, 0.2))]
    np.testing.assert_allclose(metrics["smoothed_ce_E"], want, rtol=1e-6)
    np.testing.assert_allclose(loss, sum(want), rtol=1e-6)
    assert not np.allclose(want[2], np.mean(losses.cross_entropy(logits[2:3], labels, 0.0)))  # smoothing mattered
    report = train.train_and_evaluate(config, str(tmp_path / "w"))  # the unchanged loop trains it
    assert report["method"] == "ls_exits" and len(report["exits"]) == 3
    lines = open(tmp_path / "w" / "metrics.jsonl").read()
    assert "train/smoothed_ce_exit3" in lines
  finally:
    schemes.SCHEMES.pop("ls_exits")


def test_a_scheme_that_reads_a_section_the_config_lacks_is_one_error():
  from eejax import validate  # pylint: disable=g-import-not-at-top
  schemes.register(schemes.Scheme("needs_section", loss=per_exit_smoothing, has_section=True))
  try:
    config = cifar10.get_config("smoke")
    config.scheme = "needs_section"
    with pytest.raises(UserError, match="reads a config.needs_section section"):
      validate.check_config(config)
  finally:
    schemes.SCHEMES.pop("needs_section")
