"""The one threshold type: per-exit and forced settings, JSON with never as null, picking, older runs' forms."""
import json

import numpy as np
import pytest

from eejax import thresholds
from eejax.errors import UserError


def test_per_exit_repeats_over_classes_and_stores_the_last_row_as_never():
  t = thresholds.per_exit([0.3, 0.7], 3, 2, "max_prob")
  np.testing.assert_array_equal(t, np.float32([[0.3, 0.3], [0.7, 0.7], [np.inf, np.inf]]))
  assert np.isneginf(thresholds.per_exit([0.3, 0.7, 0.0], 3, 2, "entropy")[-1]).all()  # entropy: never = -inf
  with pytest.raises(UserError, match="1 per-exit thresholds for a model with 3 exits"):
    thresholds.per_exit([0.1], 3, 2, "max_prob")


def test_forced_thresholds_make_exit_k_answer():
  t = thresholds.forced(1, 3, 4, "max_prob")
  assert np.isposinf(t[0]).all() and np.isneginf(t[1]).all()
  t = thresholds.forced(1, 3, 4, "entropy")
  assert np.isneginf(t[0]).all() and np.isposinf(t[1]).all()


def test_json_round_trip_keeps_never_per_policy():
  t = np.float32([[0.5, np.inf], [np.inf, 0.9], [np.inf, np.inf]])
  rows = thresholds.to_json(t)
  assert rows == [[0.5, None], [None, pytest.approx(0.9)], [None, None]]
  np.testing.assert_array_equal(thresholds.from_json(rows, "max_prob"), t)
  assert np.isneginf(thresholds.from_json(rows, "entropy")[0, 1])


def test_save_load_and_pick(tmp_path):
  a = thresholds.per_exit([0.3, 0.7], 3, 2, "max_prob")
  b = thresholds.per_exit([0.2, 0.4], 3, 2, "entropy")
  thresholds.save(str(tmp_path), [thresholds.entry("max_prob", a, budget=0.5), thresholds.entry("entropy", b, budget=0.5)])
  entries = thresholds.load(str(tmp_path), 3, 2)
  np.testing.assert_array_equal(thresholds.pick(entries, "max_prob", 0.5)["threshold_ExC"], a)
  np.testing.assert_array_equal(thresholds.pick(entries, "entropy", 0.5)["threshold_ExC"], b)
  with pytest.raises(UserError, match="no single max_prob threshold setting for budget 0.25.*max_prob budget 0.5"):
    thresholds.pick(entries, "max_prob", 0.25)
  with pytest.raises(UserError, match="belongs to another run"):
    thresholds.load(str(tmp_path), 4, 2)


def test_older_runs_forms_still_load(tmp_path):
  """An older run's report.json (E-1 per-exit values) and an older BTS-EE model's per-class table with nulls."""
  report = {"fitted_on_val": {"max_prob": [{"budget": 0.5, "per_exit": {"thresholds": [0.4, 0.6]}}]}}
  (tmp_path / "report.json").write_text(json.dumps(report))
  (entry,) = thresholds.load(str(tmp_path), 3, 2)
  np.testing.assert_array_equal(entry["threshold_ExC"], thresholds.per_exit([0.4, 0.6], 3, 2, "max_prob"))
  bts = tmp_path / "bts"
  bts.mkdir()
  (bts / "thresholds.json").write_text(json.dumps({"policy": "max_prob", "per_class_threshold_BxC": [[0.5, None]]}))
  (entry,) = thresholds.load(str(bts), 2, 2)
  np.testing.assert_array_equal(entry["threshold_ExC"], np.float32([[0.5, np.inf], [np.inf, np.inf]]))


def test_a_fitted_setting_keeps_its_policy_through_slices_arithmetic_and_pickle():
  import pickle  # pylint: disable=g-import-not-at-top
  t = thresholds.fitted(np.full((3, 4), 0.25), "entropy")
  for copy in (t[:2], t * 0.9, pickle.loads(pickle.dumps(t))):
    assert isinstance(copy, thresholds.Fitted) and copy.policy == "entropy"
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(t)), np.full((3, 4), 0.25, np.float32))
  assert thresholds.policy_for(t, None) == "entropy" and thresholds.policy_for(np.asarray(t), None) == "max_prob"
  with pytest.raises(UserError, match="fitted for the entropy policy, and policy='patience'"):
    thresholds.policy_for(t, "patience")
