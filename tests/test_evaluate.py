"""Evaluation maths on fixed logits, and the report files."""
import json
import os

import numpy as np

from eejax import evaluate, report
from eejax.flops import ExitMacs


def test_budget_accuracy_by_hand():
  macs = [10, 40, 60, 100]
  acc = [0.5, 0.7, 0.65, 0.9]
  out = evaluate.budget_accuracy(macs, acc, full_macs=100, budgets=(0.05, 0.5, 0.75, 1.0))
  assert out == {"0.05": None, "0.5": 0.7, "0.75": 0.7, "1.0": 0.9}


def test_policy_report_on_fixed_logits():
  # 2 exits, 4 images. Exit 1 is confident on images 0, 1 (right on 0, wrong on 1) and flat (so
  # predicting class 0, wrong) on 2, 3; exit 2 is always right.
  big, flat, one = [5.0, 0.0], [0.0, 0.0], [0.0, 5.0]
  logits = np.array([[big, big, flat, flat], [big, one, one, one]], np.float32)
  labels = np.array([0, 1, 1, 1])
  macs = ExitMacs(backbone=(10, 20), head=(1, 1), cumulative=(11, 22), full=21)
  out = evaluate.policy_report(logits, labels, macs, "max_prob", num_thresholds=5, budgets=(0.5, 0.8, 1.0))
  points = {(p["accuracy"], p["macs"]) for p in out["curve"]}
  assert (0.25, 11.0) in points  # threshold 0: everyone exits at 1; only image 0 is right there
  assert (0.75, 16.5) in points  # confident ones (0, 1) exit at 1, the flat ones go on: 3 right
  assert (1.0, 22.0) in points  # threshold above 1: all at exit 2
  assert out["budgets"] == {"0.5": None, "0.8": 0.75, "1.0": 0.75}  # the all-final point costs 22 > 21
  np.testing.assert_allclose(evaluate.exit_accuracy(logits, labels), [0.25, 1.0])


def test_report_files(tmp_path):
  rep = {"method": "joint", "model": "resnet8", "dataset": "folder:x", "full_macs": 2_000_000,
         "exits": [{"exit": 1, "accuracy": 0.5, "macs": 1_000_000}, {"exit": 2, "accuracy": 0.8, "macs": 2_000_100}],
         "policies": {"max_prob": {"curve": [{"threshold": 0.5, "accuracy": 0.6, "macs": 1_500_000}],
                                   "budgets": {"0.5": 0.5, "1.0": None}}},
         "splits": {"test": 10}}
  report.write_all(rep, str(tmp_path))
  assert json.load(open(tmp_path / "report.json", encoding="utf-8")) == rep
  md = open(tmp_path / "report.md", encoding="utf-8").read()
  assert "| 1 | 50.00 | 1.00 | 50.0 |" in md and "| 100 | n/a |" in md
  with open(tmp_path / "curve.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(tmp_path / "curve.png") > 10_000
  with open(tmp_path / "curve.pdf", "rb") as f:  # the same figure as vector graphics, for a paper
    assert f.read(5) == b"%PDF-"
  assert r"\begin{tabular}{rrrr}" in open(tmp_path / "report.tex", encoding="utf-8").read()


def test_a_single_exit_model_gets_a_report(tmp_path):
  # The plain network (exit_after = its last block) has nothing to fit: the report says so instead of failing.
  rng = np.random.default_rng(0)
  val = (rng.normal(size=(1, 20, 3)).astype(np.float32), rng.integers(0, 3, 20))
  test = (rng.normal(size=(1, 30, 3)).astype(np.float32), rng.integers(0, 3, 30))
  macs = ExitMacs(backbone=(100,), head=(3,), cumulative=(103,), full=103)
  fitted = evaluate.fitted_report(val, test, macs, "max_prob", (0.5, 1.0))
  rep = {"method": "joint", "model": "resnet8", "dataset": "folder:x", "full_macs": 103,
         "exits": [{"exit": 1, "accuracy": float(evaluate.exit_accuracy(*test)[0]), "macs": 103}],
         "policies": {}, "fitted_on_val": {"max_prob": fitted}, "splits": {"test": 30}}
  report.write_all(rep, str(tmp_path))
  md = open(tmp_path / "report.md", encoding="utf-8").read()
  want = 100 * np.mean(np.argmax(test[0][0], -1) == test[1])
  assert f"| none (one exit) | {want:.2f} | 100.0 | none | {want:.2f} | 100.0 |" in md


def test_the_certified_section_holds_its_guarantee_on_test_and_is_written(tmp_path):
  """Synthetic 3-exit logits: every certified row's test risk is within epsilon at this size; the table is written."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(__file__))
  from test_risk import population  # pylint: disable=g-import-not-at-top
  logits, labels, _ = population(12000, seed=4)
  val, test = (logits[:, :4000], labels[:4000]), (logits[:, 4000:], labels[4000:])
  macs = ExitMacs(backbone=(8, 8, 8), head=(2, 2, 2), cumulative=(10, 20, 30), full=30)
  cfg = ml_collections.ConfigDict({"risks": ("disagreement", "accuracy_loss"), "risk_epsilons": (0.02, 0.05),
                                   "risk_delta": 0.1, "risk_family": "global"})
  rows = evaluate.risk_report(val, test, macs, cfg)
  assert len(rows) == 4 and all(r["certified"] for r in rows)
  for r in rows:
    assert r["test_risk"] <= r["epsilon"] + 0.005 and r["val_macs_saved"] > 0
  saved = [r["val_macs_saved"] for r in rows if r["risk"] == "disagreement"]
  assert saved[0] < saved[1]  # a looser tolerance certifies more savings
  rep = {"method": "joint", "model": "m", "dataset": "d", "full_macs": 30, "policies": {}, "splits": {"test": 8000},
         "exits": [{"exit": e + 1, "accuracy": 0.5, "macs": c} for e, c in enumerate((10, 20, 30))], "certified": rows}
  report.write_all(rep, str(tmp_path))
  md = open(tmp_path / "report.md", encoding="utf-8").read()
  assert "## Certified thresholds (Learn then Test, `max_prob`, global family)" in md
  assert sum(line.startswith("| disagreement |") for line in md.splitlines()) == 2
  # Nothing certified: every image to the last exit, whose early heads cost a little more than the plain network.
  nothing = {**rows[0], "certified": False, "val_macs_saved": -4e-5, "test_macs_saved": -4e-5}
  assert "| no | 0.0 | " in report.certified_lines({"certified": [nothing]})[-1]  # never "-0.0"


def test_in_batches_pads_the_last_batch_trims_it_and_counts_every_image(capsys):
  images_NxHxWx3 = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
  seen = []
  def fn(x_BxHxWx3):
    seen.append(x_BxHxWx3.shape[0])
    return {"sum_B": x_BxHxWx3.reshape(x_BxHxWx3.shape[0], -1).sum(-1)}
  out = evaluate.in_batches(fn, images_NxHxWx3, 4, what="evaluating the test split", every_s=0.0)
  assert seen == [4, 4, 4]  # every batch the same size: one compilation
  np.testing.assert_array_equal(out["sum_B"], images_NxHxWx3.reshape(10, -1).sum(-1))
  lines = capsys.readouterr().err.splitlines()
  assert [line.split(" images")[0] for line in lines] == [
      "evaluating the test split: 4 of 10", "evaluating the test split: 8 of 10",
      "evaluating the test split: 10 of 10", "evaluating the test split: 10"]
