"""The workdir format: a run saves its model and statistics, loads from them alone, and older runs still load."""
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import cifar10
from conftest import make_tree, run_main, smoke_args
from eejax import data, evaluate, input_pipeline, run, state, validate, workdirs
from eejax.errors import UserError

# A run stopped part-way, written by an earlier release (tests/data/write_old_run.py; versions.json says which jax,
# flax and orbax-checkpoint wrote it), with the logits it gave on its tree's test images then.
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
                          "--config.train.epochs=2"))  # the settings it was started with (its config.json)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resuming from {workdir} at step {step}" in r.stdout
  assert step < int(expected["end_step"]) == run.load_run(workdir).step  # where the run that wrote it ended


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


def _started(workdir, config, steps=(5,)) -> str:
  """A workdir as a run of `config` leaves it once it has saved `steps`."""
  workdirs.save_config(str(workdir), config)
  for step in steps:
    os.makedirs(os.path.join(workdir, "checkpoints", str(step)))
  return str(workdir)


def test_a_run_resumes_only_with_the_settings_that_shaped_its_training(tmp_path):
  workdir = _started(tmp_path / "w", cifar10.get_config("smoke"))
  again = cifar10.get_config("smoke")
  again.train.batch_size, again.data.flip = 8, False
  with pytest.raises(UserError) as e:
    run.check_resume(workdir, again)
  assert str(e.value) == (
      f"{workdir} holds a run started with other training settings (data.flip: true there, false here; "
      f"train.batch_size: 16 there, 8 here). Nothing in it was changed: resume it with the settings in its "
      f"config.json, or train on from its weights with these in a new --workdir, with --config.init_from={workdir}")
  for key, value in (("train.warmup_epochs", 0.5), ("train.learning_rate", 0.1), ("train.schedule", "step"),
                     ("train.optimizer", "adam"), ("train.label_smoothing", 0.1), ("data.crop_pad", 0),
                     ("train.exit_weights", (1.0, 1.0, 2.0)), ("model.head_dropout", 0.5)):
    changed = cifar10.get_config("smoke")
    changed.update_from_flattened_dict({key: value})
    with pytest.raises(UserError, match=f"{key}: "):
      run.check_resume(workdir, changed)


def test_how_a_run_is_found_evaluated_saved_and_logged_may_change_when_it_resumes(tmp_path):
  workdir = _started(tmp_path / "w", cifar10.get_config("smoke"))
  again = cifar10.get_config("smoke")
  again.update_from_flattened_dict({
      "data.source": "folder:/moved/tree", "data.cache_dir": "", "compile_cache_dir": "", "init_from": "/other",
      "train.steps_per_call": 7, "train.transfer_guard": "log", "eval.batch_size": 8, "eval.every_epochs": 0.0,
      "eval.budgets": (0.5,), "checkpoint.every_steps": 3, "checkpoint.max_to_keep": 5, "log.every_s": 30.0,
      "erde.temperature": 1.0, "mate.kd_weight": 2.0, "bts.epochs": 1.0})  # other schemes' settings: not read
  run.check_resume(workdir, again)
  erde = cifar10.get_config("erde")
  erde_workdir = _started(tmp_path / "erde", erde)
  erde.erde.teacher = "/teacher/moved"  # by path: a teacher that moved is still the teacher
  run.check_resume(erde_workdir, erde)
  erde.erde.temperature = 1.0  # the scheme's own settings shape its training
  with pytest.raises(UserError, match="erde.temperature: 4.0 there, 1.0 here"):
    run.check_resume(erde_workdir, erde)


def test_a_run_resumed_to_more_epochs_says_so_and_to_fewer_is_refused(tmp_path, capsys):
  workdir = _started(tmp_path / "w", cifar10.get_config("smoke"))
  run.check_resume(workdir, cifar10.get_config("smoke"))
  assert capsys.readouterr().out == ""
  longer = cifar10.get_config("smoke")
  longer.train.epochs = 5
  run.check_resume(workdir, longer)
  assert capsys.readouterr().out == ("train.epochs 2 -> 5: this run goes on to 5 epochs from its last checkpoint, "
                                     "its learning rate following the schedule of that length from there\n")
  shorter = cifar10.get_config("smoke")
  shorter.train.epochs, shorter.train.batch_size = 1, 8  # it may be past the shorter end already
  with pytest.raises(UserError, match=r"other training settings \(train.epochs: 2 there, 1 here, and a run only "
                                      r"grows longer; train.batch_size: 16 there, 8 here\)"):
    run.check_resume(workdir, shorter)


def test_a_workdir_without_checkpoints_starts_over_with_any_settings(tmp_path):
  workdir = _started(tmp_path / "w", cifar10.get_config("smoke"), steps=())
  os.makedirs(os.path.join(workdir, "checkpoints", "5.orbax-checkpoint-tmp-1"))  # a save that never finished
  again = cifar10.get_config("smoke")
  again.train.batch_size = 8
  run.check_resume(workdir, again)


def test_an_older_config_json_compares_with_the_neutral_values_of_later_keys(tmp_path):
  workdir = _started(tmp_path / "w", cifar10.get_config("smoke"))
  path = os.path.join(workdir, "config.json")
  saved = json.load(open(path))
  del saved["train"]["grad_clip"], saved["train"]["optimizer"]  # written before those settings existed
  json.dump(saved, open(path, "w"))
  run.check_resume(workdir, cifar10.get_config("smoke"))
  clipped = cifar10.get_config("smoke")
  clipped.train.grad_clip = 1.0
  with pytest.raises(UserError, match="train.grad_clip: 0.0 there, 1.0 here"):
    run.check_resume(workdir, clipped)


def test_a_teacher_or_backbone_must_have_finished_training(smoke_run, tmp_path):
  from eejax import bts  # pylint: disable=g-import-not-at-top
  from eejax.schemes import erde, ic_only  # pylint: disable=g-import-not-at-top
  _, _, finished = smoke_run
  workdir = str(shutil.copytree(finished, tmp_path / "w"))
  loaded = run.load_run(workdir)
  loaded.check_finished("teacher")  # its report is of its last step
  report = os.path.join(workdir, "report.json")
  saved = json.load(open(report))
  json.dump({**saved, "step": loaded.step - 4}, open(report, "w"))  # its checkpoint is past its report: training on
  with pytest.raises(UserError) as e:
    loaded.check_finished("teacher")
  assert str(e.value) == (f"the teacher in {workdir} has not finished training: its latest checkpoint is step "
                          f"{loaded.step}, its report of step {loaded.step - 4}; run its command to the end first "
                          f"(or wait for the job training it)")
  os.remove(report)  # stopped before its end
  config = cifar10.get_config("smoke")
  config.erde.teacher = config.ic_only.backbone = config.bts.backbone = workdir
  heads = type("State", (), {"params": {"heads_0": {}, "heads_1": {}}})
  for role, use in (("teacher", lambda: erde.teacher(config, None, None, None)),
                    ("backbone", lambda: ic_only.init(config, heads, None, None)),
                    ("backbone", lambda: bts.prepare(config))):
    with pytest.raises(UserError, match=f"the {role} in {workdir} has not finished training: its latest checkpoint "
                                        f"is step {loaded.step}, and it has no report;"):
      use()
  json.dump({k: v for k, v in saved.items() if k != "step"}, open(report, "w"))  # written before reports named it
  loaded.check_finished("teacher")
  json.dump([], open(report, "w"))  # not a report at all
  with pytest.raises(UserError, match="and it has no report;"):
    loaded.check_finished("teacher")


def _weights(tmp_path, name: str, scale: float = 1.0, step: int = 10) -> run.Run:
  """A stand-in for a loaded teacher or backbone: what `check_frozen` reads of a Run."""
  variables = {"params": {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3) * scale}},
               "batch_stats": {"bn": {"mean": np.zeros(3, np.float32)}}}
  return run.Run(str(tmp_path / name), None, None, variables, None, step)


def test_weights_sha256_is_of_every_array_its_path_dtype_and_shape():
  kernel, mean = np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros(3, np.float32)
  reference = hashlib.sha256()  # by hand, in flattening order: batch_stats before params
  for key, a in (("['batch_stats']['bn']['mean']", mean), ("['params']['conv']['kernel']", kernel)):
    reference.update(f"{key}{a.dtype}{a.shape}".encode() + a.tobytes())
  variables = {"params": {"conv": {"kernel": kernel}}, "batch_stats": {"bn": {"mean": mean}}}
  assert run.weights_sha256(variables) == reference.hexdigest()
  assert run.weights_sha256(jax.tree.map(jax.numpy.asarray, variables)) == reference.hexdigest()  # on the device
  others = [{"params": {"conv": {"kernel": kernel.reshape(3, 2)}}, "batch_stats": variables["batch_stats"]},
            {"params": {"conv": {"kernel": kernel.astype(np.float64)}}, "batch_stats": variables["batch_stats"]},
            {"params": {"conv": {"bias": kernel}}, "batch_stats": variables["batch_stats"]},
            {"params": variables["params"], "batch_stats": {"bn": {"mean": mean + 1e-7}}}]
  assert len({run.weights_sha256(v) for v in others} | {reference.hexdigest()}) == 5


def test_a_run_keeps_the_teacher_or_backbone_it_started_with(tmp_path):
  workdir = str(tmp_path / "student")
  teacher, retrained = _weights(tmp_path, "teacher"), _weights(tmp_path, "teacher", scale=1.001, step=12)
  run.check_frozen(workdir, "teacher", teacher, resuming=False)  # a run starting: its teacher is recorded
  path = os.path.join(workdir, "teacher.json")
  recorded = json.load(open(path))
  assert recorded == {"workdir": teacher.workdir, "step": 10, "weights_sha256": run.weights_sha256(teacher.variables)}
  run.check_frozen(workdir, "teacher", _weights(tmp_path, "moved"), resuming=True)  # a copy elsewhere: the same
  with pytest.raises(UserError) as e:
    run.check_frozen(workdir, "teacher", retrained, resuming=True)
  assert str(e.value) == (
      f"{workdir} was trained so far with the teacher in {teacher.workdir} (step 10), and the teacher in "
      f"{retrained.workdir} (step 12) holds other weights. Nothing in it was changed: resume it with its own "
      f"teacher (teacher.json), or train with this one in a new --workdir")
  assert json.load(open(path)) == recorded
  run.check_frozen(workdir, "teacher", retrained, resuming=False)  # no checkpoint yet: the run starts over with it
  assert json.load(open(path))["step"] == 12
  os.remove(path)  # a run begun before teachers were recorded: its teacher from now on
  run.check_frozen(workdir, "teacher", teacher, resuming=True)
  assert json.load(open(path))["step"] == 10
