"""The public API: a notebook's cells, one call each, on a finished smoke run."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import eejax
from eejax import api, calibration, data, policies, thresholds
from eejax.errors import UserError
from eejax.flops import exit_macs


def test_fit_for_a_budget_is_the_setting_the_report_fitted(smoke_run):
  _, _, workdir = smoke_run
  run = eejax.load_run(workdir)
  for policy in ("max_prob", "entropy"):
    got = eejax.fit_thresholds(run, budget=0.5, policy=policy)
    saved = thresholds.pick(thresholds.load(workdir, 3, 3), policy, 0.5)["threshold_ExC"]
    np.testing.assert_array_equal(got, saved)


def test_fit_for_a_target_accuracy_is_the_cheapest_that_reaches_it(smoke_run):
  _, _, workdir = smoke_run
  run = eejax.load_run(workdir)
  saved = np.load(os.path.join(workdir, "logits.npz"))
  score, pred = policies.scores(jnp.asarray(saved["val_logits"]), "max_prob")
  cost_E = exit_macs(run.model, (16, 16, 3)).cumulative
  candidates = calibration.per_exit_candidates(score, "max_prob")
  acc_K, macs_K = (np.asarray(a) for a in calibration.search(score, pred, jnp.asarray(saved["val_labels"]),
                                                              np.float32(cost_E), candidates))
  target = float(np.median(acc_K))
  t = eejax.fit_thresholds(run, target_accuracy=target, save=True)
  acc, macs = (float(a[0]) for a in calibration.search(score, pred, jnp.asarray(saved["val_labels"]),
                                                        np.float32(cost_E), t[None]))
  assert acc >= target and macs == pytest.approx(macs_K[acc_K >= target].min(), rel=1e-6)
  entries = thresholds.load(workdir, 3, 3)
  assert any(e.get("target_accuracy") == target for e in entries)  # saved beside the budget ones
  with pytest.raises(UserError, match="exactly one"):
    eejax.fit_thresholds(run, budget=0.5, target_accuracy=0.5)


def test_predict_is_the_simulated_policy_and_export_verifies(smoke_run):
  root, _, workdir = smoke_run
  run = eejax.load_run(workdir)
  t = eejax.fit_thresholds(run, budget=0.5)
  test = data.from_config(run.config.data).test
  pred_N, exit_N, cost_N = eejax.predict(run, test.images_NxHxWx3, t, batch_size=8)
  logits = np.load(os.path.join(workdir, "logits.npz"))["test_logits"]
  score, pred = policies.scores(jnp.asarray(logits), "max_prob")
  want_exit = np.asarray(policies.first_exit(score, pred, t[None]))[0]
  np.testing.assert_array_equal(exit_N, want_exit)
  np.testing.assert_array_equal(pred_N, np.asarray(pred)[want_exit, np.arange(len(want_exit))])
  from eejax import export_onnx  # pylint: disable=g-import-not-at-top
  formats = ("stablehlo",) + (("onnx_stages",) if export_onnx.available() is None else ())
  report = eejax.export_run(run, str(root / "export"), t, formats=",".join(formats), num_images=6)  # or a tuple
  assert report["formats"]["stablehlo"]["status"] == "ok"
  assert json.load(open(root / "export" / "export_report.json"))["thresholds"] == "the caller"
  if "onnx_stages" in formats:  # the shipped driver, at the thresholds it was given, answers as eejax.predict
    from eejax.cascade_runtime import Cascade  # pylint: disable=g-import-not-at-top
    logits_NxC, driver_exit_N = Cascade(str(root / "export" / "cascade_onnx_stages.json"))(test.images_NxHxWx3)
    np.testing.assert_array_equal(driver_exit_N, exit_N)
    np.testing.assert_array_equal(logits_NxC.argmax(-1), pred_N)


def test_nothing_certified_saves_nothing_and_says_so_without_a_minus(smoke_run, capsys):
  run = eejax.load_run(smoke_run[2])
  out = eejax.certify_thresholds(run, 1e-6)  # nothing certifies: every image to the last exit, heads and all
  assert not out["certified"] and out["macs"] > exit_macs(run.model, (16, 16, 3)).full
  assert capsys.readouterr().out.strip().endswith(", 0.0% of the MACs saved")  # not "-0.0%"


def test_thresholds_run_with_the_policy_they_were_fitted_for(smoke_run, tmp_path):
  _, _, workdir = smoke_run
  run = eejax.load_run(workdir)
  test = data.from_config(run.config.data).test
  logits = jnp.asarray(np.load(os.path.join(workdir, "logits.npz"))["test_logits"])
  t = eejax.fit_thresholds(run, budget=0.5, policy="entropy")  # units of entropy, not of probability
  assert t.policy == "entropy" and t[:2].policy == "entropy"
  score, pred = policies.scores(logits, "entropy")
  want_exit = np.asarray(policies.first_exit(score, pred, np.asarray(t)[None], "entropy"))[0]
  np.testing.assert_array_equal(eejax.predict(run, test.images_NxHxWx3, t)[1], want_exit)
  score, pred = policies.scores(logits, "max_prob")  # a plain array is read as max_prob, as before
  want_exit = np.asarray(policies.first_exit(score, pred, np.asarray(t)[None]))[0]
  np.testing.assert_array_equal(eejax.predict(run, test.images_NxHxWx3, np.asarray(t))[1], want_exit)
  with pytest.raises(UserError, match="fitted for the entropy policy, and policy='max_prob'"):
    eejax.predict(run, test.images_NxHxWx3, t, policy="max_prob")
  with pytest.raises(UserError, match="fitted for the entropy policy"):
    eejax.export_run(run, str(tmp_path / "x"), t, policy="max_prob")
  assert not (tmp_path / "x").exists()
  assert eejax.certify_thresholds(run, 0.2, policy="entropy")["threshold_ExC"].policy == "entropy"


def test_a_call_the_run_cannot_answer_is_one_line(smoke_run):
  _, _, workdir = smoke_run
  run = eejax.load_run(workdir)  # 16x16x3 images, 3 exits
  t = eejax.fit_thresholds(run, budget=0.5)
  for goal, message in [({"budget": 0.0}, "budget=0.0 must be a fraction of the full network's MACs"),
                        ({"budget": 1.5}, "budget=1.5 must be"),
                        ({"target_accuracy": 70.0}, r"target_accuracy=70.0 must be a fraction between 0 and 1")]:
    with pytest.raises(UserError, match="^" + message):
      eejax.fit_thresholds(run, **goal)
  images = np.zeros((2, 16, 16, 3), np.uint8)
  for batch_size in (0, -8, 2.5):
    with pytest.raises(UserError, match=f"^batch_size={batch_size}: give a whole number of images of at least 1$"):
      eejax.predict(run, images, t, batch_size=batch_size)
  unset = t.copy()
  unset[1, 0] = np.nan
  with pytest.raises(UserError, match=r"^threshold_ExC holds NaN at exit\(s\) 2;"):
    eejax.export_run(run, os.path.join(workdir, "never"), unset)
  assert not os.path.exists(os.path.join(workdir, "never"))
  for bad in (images[..., 0], np.zeros((2, 32, 32, 3), np.uint8), images.astype(np.float32) / 255):
    with pytest.raises(UserError, match=r"^images of shape .*; this run takes uint8 Nx16x16x3 images"):
      eejax.predict(run, bad, t)
  for kwargs, message in [({"epsilon": 5.0}, "risk tolerances 5 and delta 0.1: each must lie strictly between"),
                          ({"epsilon": 0.05, "delta": 1.5}, "risk tolerances 0.05 and delta 1.5"),
                          ({"epsilon": "0.05"}, "risk tolerances '0.05' and delta 0.1: each must"),
                          ({"epsilon": 0.05, "delta": None}, "risk tolerances 0.05 and delta None: each must")]:
    with pytest.raises(UserError, match="^" + message):
      eejax.certify_thresholds(run, **kwargs)
  for kwargs, message in [({"budget": "0.5"}, "budget='0.5' must be a fraction"),
                          ({"target_accuracy": True}, "target_accuracy=True must be a fraction")]:
    with pytest.raises(UserError, match="^" + message):
      eejax.fit_thresholds(run, **kwargs)


def test_predict_on_no_images_is_empty_and_an_unreachable_goal_says_so(smoke_run, capsys):
  _, _, workdir = smoke_run
  run = eejax.load_run(workdir)
  t = eejax.fit_thresholds(run, budget=0.5)
  some = [np.asarray(a) for a in eejax.predict(run, np.zeros((3, 16, 16, 3), np.uint8), t)]
  none = eejax.predict(run, np.zeros((0, 16, 16, 3), np.uint8), t)
  assert [(a.shape, a.dtype) for a in none] == [((0,), a.dtype) for a in some]
  with pytest.raises(UserError, match="^a threshold of shape"):
    eejax.predict(run, np.zeros((0, 16, 16, 3), np.uint8), t[:1])
  capsys.readouterr()
  cheapest = eejax.fit_thresholds(run, budget=1e-6)
  shown = capsys.readouterr().out  # the thresholds as numbers of 4 decimals, not float32's 0.11749999970197678
  assert shown.startswith(f"max_prob thresholds {[round(float(v), 4) for v in cheapest[:-1, 0]]}: ")
  assert all(len(v.split(".")[-1]) <= 4 for v in shown.split("[")[1].split("]")[0].split(", ")), shown
  eejax.fit_thresholds(run, budget=1e-6)
  assert "no setting is within the budget of 0.0001%: this is the cheapest" in capsys.readouterr().out
  macs = exit_macs(run.model, (16, 16, 3)).cumulative
  saved = np.load(os.path.join(workdir, "logits.npz"))
  score, pred = policies.scores(jnp.asarray(saved["val_logits"]), "max_prob")
  candidates = calibration.per_exit_candidates(score, "max_prob")
  _, macs_K = calibration.search(score, pred, jnp.asarray(saved["val_labels"]), np.float32(macs), candidates)
  _, got = calibration.search(score, pred, jnp.asarray(saved["val_labels"]), np.float32(macs), cheapest[None])
  assert float(got[0]) == pytest.approx(float(np.min(macs_K)), rel=1e-6)
  eejax.fit_thresholds(run, target_accuracy=1.0)
  out = capsys.readouterr().out
  assert ("no setting reaches 100%: this is the most accurate" in out) == ("validation accuracy 100.00%" not in out)


def test_train_and_evaluate_takes_a_configdict_and_a_folder_or_says_what_it_takes(tmp_path):
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  for config in ({"data": {}}, None, "configs/cifar10.py"):  # an AttributeError from deep inside, before
    with pytest.raises(UserError, match=r"^config is a \w+; give an ml_collections.ConfigDict, e.g. configs.cifar10"):
      eejax.train_and_evaluate(config, str(tmp_path / "w"))
  config = cifar10.get_config("smoke")
  config.data.source = f"folder:{tmp_path / 'none'}"
  for workdir in (None, "", 5):
    with pytest.raises(UserError, match=r"^workdir=.*: give the path of a folder for the run$"):
      eejax.train_and_evaluate(config, workdir)
  with pytest.raises(UserError, match="^data folder .* not found"):  # a pathlib.Path is a path: on to the data
    eejax.train_and_evaluate(config, tmp_path / "w")
  # A run's folder where its Run is wanted: an AttributeError ('str' object has no attribute 'model'), before.
  images, t = np.zeros((1, 16, 16, 3), np.uint8), np.zeros((3, 10), np.float32)
  for call in (lambda r: eejax.fit_thresholds(r, budget=0.5), lambda r: eejax.certify_thresholds(r, 0.05),
               lambda r: eejax.predict(r, images, t), lambda r: eejax.export_run(r, str(tmp_path / "x"))):
    with pytest.raises(UserError, match=r"^run is a str; give the Run that eejax.load_run\('/runs/a'\) returns$"):
      call("/runs/a")
    with pytest.raises(UserError, match=r"^run is a NoneType; give the Run that eejax.load_run\(WORKDIR\) returns$"):
      call(None)
  with pytest.raises(UserError, match=r"^workdir=None: give the path of a run's folder$"):
    eejax.load_run(None)


def test_the_package_lists_its_api_before_importing_it():
  """`import eejax` stays light (the API loads on first use), yet dir() and tab completion name every call."""
  out = subprocess.run([sys.executable, "-c", "import sys, eejax; print(dir(eejax)); print('eejax.api' in sys.modules)"],
                       capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  listed, api_loaded = out.stdout.splitlines()
  names = ("train_and_evaluate", "load_run", "fit_thresholds", "certify_thresholds", "predict", "export_run", "Run")
  assert all(repr(n) in listed for n in names) and api_loaded == "False"
  assert sorted(eejax.__all__) == sorted(names) and all(getattr(eejax, n) is getattr(api, n) for n in names)
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    eejax.nope  # pylint: disable=pointless-statement
