"""The workdir format: a run saves its model and statistics, loads from them alone, and older runs still load."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import cifar10
from conftest import make_tree, run_main, smoke_args
from eejax import data, evaluate, input_pipeline, run, state, validate
from eejax.errors import UserError

# A finished run written by an earlier release (tests/data/write_old_run.py; versions.json says which jax, flax and
# orbax-checkpoint wrote it), with the logits it gave on its tree's test images then.
OLD_RUN = os.path.join(os.path.dirname(__file__), "data", "old_run")


def old_run_tree(root: str):
  """expected.npz of the old run, and the tree it was trained on made again at `root` ({split: (images, labels)})."""
  expected = np.load(os.path.join(OLD_RUN, "expected.npz"))
  return expected, make_tree(root, per_class=tuple(int(n) for n in expected["per_class"]), size=int(expected["size"]))


def test_run_json_holds_the_model_and_the_training_images_statistics(smoke_run):
  _, _, workdir = smoke_run
  loaded = run.load_run(workdir)
  ds = data.from_config(loaded.config.data)
  mean_C, std_C = input_pipeline.channel_stats(ds.train.images_NxHxWx3)
  np.testing.assert_array_equal(loaded.spec.stats[0], mean_C)
  np.testing.assert_array_equal(loaded.spec.stats[1], std_C)
  assert loaded.spec.model["arch"] == "resnet8" and loaded.spec.num_classes == 3
  assert loaded.model.num_exits == 3 and loaded.spec.image_shape == (16, 16, 3)
  assert loaded.spec.class_names == ds.class_names == ("cat", "dog", "ship")
  path = os.path.join(workdir, "run.json")
  saved = open(path).read()
  raw = json.loads(saved)
  del raw["class_names"]  # a run saved before the names were recorded: loads, without them
  json.dump(raw, open(path, "w"))
  assert run.load_run(workdir).spec.class_names == ()
  open(path, "w").write(saved)
  assert os.path.exists(os.path.join(workdir, "thresholds.json"))


def test_an_older_workdir_loads_with_its_statistics_computed_once(smoke_run, tmp_path, capsys):
  _, _, workdir = smoke_run
  old = str(tmp_path / "old")
  shutil.copytree(workdir, old)
  with open(os.path.join(old, "run.json"), "w") as f:  # what runs saved before run.json held more
    json.dump({"num_classes": 3, "image_shape": [16, 16, 3]}, f)
  config = json.load(open(os.path.join(old, "config.json")))
  del config["model"]["exit_grad_scale"], config["train"]["grad_clip"]  # keys added later
  json.dump(config, open(os.path.join(old, "config.json"), "w"))
  before, after = run.load_run(workdir), run.load_run(old)
  assert "computing them once" in capsys.readouterr().out
  assert after.spec == before.spec and after.config.train.grad_clip == 0.0
  jax.tree.map(np.testing.assert_array_equal, before.variables, after.variables)
  run.load_run(old)
  assert "computing them once" not in capsys.readouterr().out  # saved the first time


def test_a_run_an_earlier_release_wrote_loads_and_answers_as_it_did_then(tmp_path):
  """Its whole training state (parameters, BatchNorm statistics, momentum) restores on this stack, whatever jax,
  flax and orbax-checkpoint it runs, and its variables give the logits they gave when written."""
  workdir = shutil.copytree(OLD_RUN, tmp_path / "w")
  expected, splits = old_run_tree(str(tmp_path / "tree"))
  test_NxHxWx3 = splits["test"][0]
  loaded = run.load_run(str(workdir))
  logits_ExNxC = evaluate.run_logits(loaded, test_NxHxWx3, batch_size=len(test_NxHxWx3))
  assert loaded.step == int(expected["step"]) and logits_ExNxC.shape == expected["logits_ExNxC"].shape
  np.testing.assert_allclose(logits_ExNxC, expected["logits_ExNxC"], rtol=1e-4, atol=1e-4)


def test_a_run_an_earlier_release_wrote_resumes_where_it_stopped(tmp_path):
  """Its identity still matches the same command's, so an upgrade never turns a run into 'a different run'."""
  workdir = str(shutil.copytree(OLD_RUN, tmp_path / "w"))
  tree = str(tmp_path / "tree")
  expected, _ = old_run_tree(tree)
  step = int(expected["step"])
  r = run_main(smoke_args(tree, workdir, "", "--config.eval.real_inference=False", "--config.log.tensorboard=False",
                          "--config.train.epochs=2"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resuming from {workdir} at step {step}" in r.stdout
  assert run.load_run(workdir).step == 2 * step


def test_not_a_workdir_and_a_mismatched_run_are_one_line(smoke_run, tmp_path):
  _, _, workdir = smoke_run
  with pytest.raises(UserError, match="is not an eejax workdir"):
    run.load_run(str(tmp_path))
  spec = run.load_run(workdir).spec
  with pytest.raises(UserError, match=r"teacher in W was trained on 3 classes of \[16, 16, 3\] images; this run has "
                                      r"10 classes of \[32, 32, 3\]"):
    spec.check_matches(10, (32, 32, 3), "teacher", "W")


def test_an_older_config_json_gets_every_later_key_with_its_neutral_value(tmp_path):
  """A setting added since a run was saved reads as its neutral value, and the filled config is whole again."""
  config = cifar10.get_config("smoke")
  older = json.loads(config.to_json_best_effort())
  for key in run.LATER_KEYS:
    section, name = key.split(".")
    del older[section][name]
  (tmp_path / "config.json").write_text(json.dumps(older))
  (tmp_path / "run.json").write_text("{}")
  loaded = run.load_config(str(tmp_path))
  for key, value in run.LATER_KEYS.items():
    section, name = key.split(".")
    assert loaded[section][name] == value, key
  # Every key of today's config is back, so everything that reads one (the optimizer, the checks) runs.
  assert set(loaded.train.keys()) == set(config.train.keys()) and set(loaded.model.keys()) == set(config.model.keys())
  validate.check_config(loaded)
  state.make_optimizer(loaded.train, state.make_schedule(loaded.train, steps_per_epoch=4))
