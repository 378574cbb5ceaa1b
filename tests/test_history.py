"""A run's history: validation scores against optax, metrics.jsonl read back, per-epoch means, summary, figure,
and `python -m eejax.history`."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from eejax import history
from eejax.errors import UserError


def test_validation_metrics_match_optax_and_count_correct_answers():
  rng = np.random.default_rng(0)
  logits_ExNxC = rng.normal(size=(3, 50, 7)).astype(np.float32) * 4
  labels_N = rng.integers(0, 7, 50)
  out = history.validation_metrics(logits_ExNxC, labels_N, epoch=2.5)
  assert out["val/epoch"] == 2.5 and len(out) == 1 + 2 * 3
  for e in range(3):
    want_ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits_ExNxC[e]), jnp.asarray(labels_N))
    np.testing.assert_allclose(out[f"val/ce_exit{e + 1}"], float(want_ce.mean()), rtol=1e-5)
    correct = sum(int(np.argmax(logits_ExNxC[e, n]) == labels_N[n]) for n in range(50))
    assert out[f"val/accuracy_exit{e + 1}"] == correct / 50


def write(workdir, lines):
  with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
    f.write("".join(lines))


def test_read_leaves_out_a_cut_line_and_series_keeps_the_value_written_last(tmp_path):
  assert history.read(str(tmp_path)) == []
  write(str(tmp_path), [json.dumps({"step": 2, "train/loss": 3.0}) + "\n",
                        json.dumps({"step": 4, "train/loss": 2.0}) + "\n",
                        json.dumps({"step": 4, "train/loss": 1.5}) + "\n",  # a resumed run wrote step 4 again
                        json.dumps({"step": 3, "train/loss": 2.5}) + "\n",
                        '{"step": 6, "train/lo'])  # the process died mid-line
  with open(tmp_path / "metrics.jsonl", "ab") as f:  # and a disk that lost power left a block of other bytes
    f.write(b"\n\xff\xfe\x00\x9c garbage\n")
  records = history.read(str(tmp_path))
  assert len(records) == 4
  steps, values = history.series(records, "train/loss")
  assert steps.tolist() == [2, 3, 4] and values.tolist() == [3.0, 2.5, 1.5]


def records_of(val_points, train_points):
  """val_points: [(step, epoch, [acc per exit])]; train_points: [(step, [acc per exit])]."""
  records = [{"step": s, **{f"train/accuracy_exit{e + 1}": a for e, a in enumerate(accs)}} for s, accs in train_points]
  for s, epoch, accs in val_points:
    records.append({"step": s, "val/epoch": epoch, **{f"val/accuracy_exit{e + 1}": a for e, a in enumerate(accs)}})
  return records


def test_interval_means_weigh_each_chunk_by_its_steps():
  # Chunks of 2, 2 and 6 steps ending at 2, 4, 10; validation at 4 and 10.
  records = records_of([], [(2, [0.1]), (4, [0.3]), (10, [0.5])])
  means = history.interval_means(records, "train/accuracy_exit1", [4, 10, 12])
  np.testing.assert_allclose(means[:2], [(2 * 0.1 + 2 * 0.3) / 4, 0.5])
  assert np.isnan(means[2])  # no chunk ended in (10, 12]


def test_missed_finds_the_validation_a_stop_at_its_boundary_skipped():
  # Epochs of 5 steps, 2-step chunks: the loop validates at 6, 10, 16, 20 (and at the end, 20).
  val = lambda *steps: [{"step": s, "val/epoch": s / 5} for s in steps] + [{"step": 8, "train/loss": 1.0}]
  assert not history.missed([], 0, 5, 20)  # a fresh run
  assert not history.missed([], 4, 5, 20)  # stopped before the first interval ended
  assert history.missed([], 6, 5, 20)  # stopped at the first boundary: nothing written
  assert not history.missed(val(6), 6, 5, 20) and not history.missed(val(6), 8, 5, 20)
  assert history.missed(val(6), 10, 5, 20)  # stopped at step 10, the second boundary
  assert not history.missed(val(6, 10), 12, 5, 20)
  assert history.missed(val(6, 10, 16), 20, 5, 20)  # stopped at the last step: the final validation is due
  assert not history.missed(val(6, 10, 16, 20), 20, 5, 20)
  # Records from past the checkpoint (a crash after step 16's validation, resumed from 12) do not count.
  assert not history.missed(val(6, 10, 16), 12, 5, 20) and history.missed(val(16), 12, 5, 20)


def test_summary_finds_the_best_epoch_and_the_last():
  records = records_of([(5, 1.0, [0.4, 0.5]), (10, 2.0, [0.6, 0.7]), (15, 3.0, [0.5, 0.75])],
                       [(5, [0.45, 0.5]), (10, [0.7, 0.8]), (15, [0.9, 0.95])])
  rows = history.summary(records)
  assert [r["exit"] for r in rows] == [1, 2]
  assert (rows[0]["best_val_accuracy"], rows[0]["best_epoch"], rows[0]["final_val_accuracy"]) == (0.6, 2.0, 0.5)
  assert (rows[1]["best_val_accuracy"], rows[1]["best_epoch"], rows[1]["final_epoch"]) == (0.75, 3.0, 3.0)
  assert rows[0]["final_train_accuracy"] == 0.9 and rows[0]["points"] == 3
  assert history.summary(records_of([], [(5, [0.1])])) == []


def test_plot_draws_png_and_pdf_only_for_a_run_that_validated(tmp_path):
  path = str(tmp_path / "training.png")
  assert not history.plot(records_of([], [(5, [0.1])]), path) and not os.path.exists(path)
  records = records_of([(5, 1.0, [0.4]), (10, 2.0, [0.6])], [(5, [0.45]), (10, [0.7])])
  assert history.plot(records, path, "title")
  assert os.path.getsize(path) > 1000 and os.path.getsize(str(tmp_path / "training.pdf")) > 1000


def test_show_tells_how_a_run_is_going_and_a_mistake_is_one_line(tmp_path):
  records = records_of([(5, 1.0, [0.4]), (10, 2.0, [0.6])], [(5, [0.45]), (10, [0.7])])
  write(str(tmp_path), [json.dumps(r) + "\n" for r in records] + ['{"step": 12, "train/acc'])  # still writing
  text = history.show(str(tmp_path), str(tmp_path / "out"))
  assert "| 1 | 60.00 | 2.0 | 60.00 | 2.0 | 70.00 |" in text and (tmp_path / "out" / "training.png").exists()
  (tmp_path / "a_file").write_text("")
  with pytest.raises(UserError, match=r"^--out=.*/a_file is a file, not a folder: give the figure a folder's path"):
    history.show(str(tmp_path), str(tmp_path / "a_file"))  # was "File exists: ..."
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(UserError, match=r"^'.*/empty' is not an eejax workdir \(no config.json and run.json\)"):
    history.show(str(empty))
  (empty / "config.json").write_text("{}")  # a run that has not logged yet, or BTS-EE's branches
  with pytest.raises(UserError, match=r"/empty has no metrics.jsonl: its run has not logged yet, or was not trained"):
    history.show(str(empty))
  (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n")
  with pytest.raises(UserError, match="no validation during training yet"):
    history.show(str(empty))
  r = subprocess.run([sys.executable, "-m", "eejax.history", f"--workdir={tmp_path / 'none'}"], cwd=REPO,
                     capture_output=True, text=True, check=False)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      f"eejax.history: error: '{tmp_path / 'none'}' is not a folder: give --workdir of a run"]
