"""BTS-EE: batches from the images in play only, stage-by-stage exclusion, a frozen backbone, the CLI job."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, make_tree, run_main
from eejax import boosted, data, input_pipeline, policies, run, thresholds
from eejax.boosted import Features, Settings
from eejax.errors import UserError
from eejax.models.heads import Conv1dHead


def test_batches_come_only_from_images_in_play_and_cover_them():
  in_play = np.zeros(100, bool)
  in_play[np.random.default_rng(0).choice(100, 37, replace=False)] = True
  key = jax.random.key(0)
  seen = [np.asarray(boosted.batch_from(key, jnp.int32(s), jnp.asarray(in_play), jnp.int32(37), 8))
          for s in range(4)]  # 37 // 8 = 4 steps: one epoch
  seen = np.concatenate(seen)
  assert in_play[seen].all()
  assert len(np.unique(seen)) == 32  # an epoch draws without replacement
  small = np.asarray(boosted.batch_from(key, jnp.int32(0), jnp.asarray(in_play), jnp.int32(37), 64))
  assert in_play[small].all() and len(np.unique(small)) == 37  # fewer than a batch left: cycled, all of them


def test_conv1d_head_on_pooled_features_equals_the_head_on_the_map():
  head = Conv1dHead(5, width=4)
  h = jax.random.normal(jax.random.key(0), (3, 4, 4, 16))
  params = head.init(jax.random.key(1), h)
  pooled = jnp.mean(h, axis=(1, 2))[:, None, None, :]
  np.testing.assert_allclose(head.apply(params, h), head.apply(params, pooled), rtol=1e-5, atol=1e-6)


def synthetic_features(seed=0, n=(600, 300, 300), c=4):
  """Three blocks whose pooled features separate the classes better and better; a strong final classifier."""
  rng = np.random.default_rng(seed)
  splits = []
  centres = [rng.normal(size=(c, 8 * (b + 1))) for b in range(3)]
  for size in n:
    labels = rng.integers(0, c, size)
    easy = rng.random(size) < 0.5  # half the images are easy at every block
    pooled = tuple((centres[b][labels] * np.where(easy, 3.0, 0.3)[:, None] * (1 + b)
                    + rng.normal(size=(size, 8 * (b + 1)))).astype(np.float32) for b in range(3))
    final = np.where(rng.random(size) < 0.9, labels, rng.integers(0, c, size))
    splits.append(Features(pooled, (6.0 * np.eye(c)[final]).astype(np.float32), labels))
  return splits


def test_stage_k_never_trains_on_images_earlier_branches_answered():
  train_f, val_f, _ = synthetic_features()
  settings = Settings(epochs=3, batch_size=32, learning_rate=1e-2, steps_per_call=5)
  params, threshold_ExC, stages = boosted.fit_branches(train_f, val_f, (1, 2), 4, 0.05, True, settings,
                                                    boosted.device_arrays(train_f), record=True, log=lambda s: None)
  # What each branch answers on the training set, recomputed here from its parameters and thresholds.
  head = Conv1dHead(4, width=4)
  exited = np.zeros(len(train_f.labels_N), bool)
  for b, pos in enumerate((1, 2)):
    seen = stages[b]["seen"]
    assert not exited[seen].any(), f"branch {b + 1} trained on images an earlier branch answered"
    assert len(seen) == (~exited).sum() == stages[b]["train_images"]  # and on every image still in play
    logits = head.apply({"params": params[b]}, jnp.asarray(train_f.pooled[pos - 1])[:, None, None, :])
    conf, pred = (np.asarray(a)[0] for a in policies.max_prob(logits[None]))
    exited |= conf >= threshold_ExC[b][pred]
  assert 0 < stages[0]["train_exits"] < len(train_f.labels_N)  # the exclusion did something
  # Non-boosted: every branch sees every image.
  _, _, stages = boosted.fit_branches(train_f, val_f, (1, 2), 4, 0.05, False, settings,
                                      boosted.device_arrays(train_f), record=True, log=lambda s: None)
  assert [len(s["seen"]) for s in stages] == [len(train_f.labels_N)] * 2


@pytest.fixture(scope="module")
def backbone_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("bts")
  tree = str(root / "tree")
  make_tree(tree, per_class=(40, 12), size=16)
  workdir = str(root / "backbone")
  r = run_main(["--config", "configs/cifar10.py:smoke", f"--workdir={workdir}", f"--config.data.source=folder:{tree}",
                "--config.data.cache_dir=", "--config.data.max_images=0", "--config.data.val_size=24",
                "--config.model.name=resnet20", "--config.train.epochs=3"])
  assert r.returncode == 0, r.stderr[-3000:]
  return root, tree, workdir


def bts_args(tree, backbone, workdir, *extra, margins="0.0,0.1"):
  return ["--config", "configs/cifar10.py:bts", f"--workdir={workdir}", f"--config.bts.backbone={backbone}",
          f"--config.data.source=folder:{tree}", "--config.data.cache_dir=", "--config.data.val_size=24",
          "--config.bts.positions=2,5", f"--config.bts.margins={margins}", "--config.bts.epochs=2",
          "--config.bts.batch_size=16", "--config.bts.steps_per_call=4", "--config.eval.batch_size=16", *extra]


def test_bts_job_keeps_the_backbone_bit_identical_and_its_models_reload(backbone_run):
  root, tree, backbone = backbone_run
  before = run.load_run(backbone).variables
  workdir = str(root / "bts")
  r = run_main(bts_args(tree, backbone, workdir))
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert {(row["mode"], row["margin"]) for row in report["rows"]} == {
      ("boosted", 0.0), ("boosted", 0.1), ("nonboosted", 0.0), ("nonboosted", 0.1)}
  assert len(report["pairs"]) == 2 and os.path.exists(os.path.join(workdir, "curve.png"))
  after = run.load_run(backbone).variables  # the backbone run itself is untouched
  jax.tree.map(np.testing.assert_array_equal, before, after)
  branches = run.load_run(os.path.join(workdir, "models", "boosted_m0.1"))
  with pytest.raises(UserError, match=rf"^'{workdir}' is a BTS-EE job, whose models are runs of their own: give "
                                      rf"{workdir}/models/NAME, NAME one of boosted_m0, boosted_m0.1, "
                                      r"nonboosted_m0, nonboosted_m0.1$"):
    run.load_run(workdir)  # the job's own folder, given to export or a benchmark by mistake
  config, model, variables = branches.config, branches.model, branches.variables
  assert model.head == "conv1d" and tuple(model.exit_after) == (2, 5)
  for collection in ("params", "batch_stats"):  # stem, blocks and BN statistics: bit-identical to the backbone
    backbone_part = {k: v for k, v in before[collection].items() if k.startswith(("stem_", "blocks_"))}
    branch_part = {k: v for k, v in variables[collection].items() if k.startswith(("stem_", "blocks_"))}
    assert backbone_part.keys() == branch_part.keys() and backbone_part
    jax.tree.map(np.testing.assert_array_equal, backbone_part, branch_part)
  final = max((k for k in before["params"] if k.startswith("heads_")), key=lambda k: int(k.split("_")[1]))
  jax.tree.map(np.testing.assert_array_equal, before["params"][final], variables["params"]["heads_2"])
  # The reloaded network's exits give the accuracies the report states (the cached-feature path).
  ds = data.from_config(config.data)
  mean, std = branches.spec.stats
  np.testing.assert_array_equal(np.stack(input_pipeline.channel_stats(ds.train.images_NxHxWx3)), np.stack([mean, std]))
  logits, _ = model.apply(variables, input_pipeline.normalize(jnp.asarray(ds.test.images_NxHxWx3), mean, std))
  row = next(r for r in report["rows"] if r["mode"] == "boosted" and r["margin"] == 0.1)
  np.testing.assert_allclose((np.argmax(logits, -1) == ds.test.labels_N).mean(-1), row["test"]["exit_accuracy"],
                             atol=1e-6)
  (saved,) = thresholds.load(os.path.join(workdir, "models", "boosted_m0.1"), 3, 3)
  assert saved["method"] == "cpm" and saved["margin"] == 0.1 and saved["policy"] == "max_prob"
  np.testing.assert_array_equal(saved["threshold_ExC"], thresholds.from_json(row["threshold_ExC"], "max_prob"))
  assert np.isposinf(saved["threshold_ExC"][-1]).all()  # the final classifier's row: never read, stored as never
  # Run again: every finished model is kept, not retrained; another margin is added to the same report.
  again = run_main(bts_args(tree, backbone, workdir, margins="0.0,0.1,0.2"))
  assert again.returncode == 0 and again.stdout.count("finished before, kept") == 4, again.stdout
  rerun = json.load(open(os.path.join(workdir, "report.json")))
  assert rerun["rows"][0] == json.loads(json.dumps(report["rows"][0])) and len(rerun["rows"]) == 6
  changed = run_main(bts_args(tree, backbone, workdir, "--config.bts.epochs=3"))
  assert changed.returncode == 2 and "other bts settings (epochs)" in changed.stderr.splitlines()[-1]


def test_bts_job_keeps_the_backbone_it_started_with(backbone_run, tmp_path):
  from test_faults import tree_digest  # pylint: disable=g-import-not-at-top
  root, tree, backbone = backbone_run
  mine, workdir = str(shutil.copytree(backbone, tmp_path / "backbone")), str(tmp_path / "bts")
  r = run_main(bts_args(tree, mine, workdir, "--config.bts.baseline=false", margins="0.0"))
  assert r.returncode == 0, r.stderr[-3000:]
  recorded = json.load(open(os.path.join(workdir, "backbone.json")))
  assert recorded["weights_sha256"] == run.weights_sha256(run.load_run(backbone).variables)
  moved = str(shutil.copytree(mine, tmp_path / "moved"))  # the same backbone elsewhere, a data cache set: resumed
  r = run_main(bts_args(tree, moved, workdir, "--config.bts.baseline=false", f"--config.data.cache_dir={tmp_path}/c",
                        margins="0.0"))
  assert r.returncode == 0 and "boosted_m0: finished before, kept" in r.stdout, r.stderr[-3000:]
  other = str(tmp_path / "other")  # the same command with another seed: the backbone trained again, say
  r = run_main(["--config", "configs/cifar10.py:smoke", f"--workdir={other}", f"--config.data.source=folder:{tree}",
                "--config.data.cache_dir=", "--config.data.max_images=0", "--config.data.val_size=24",
                "--config.model.name=resnet20", "--config.train.epochs=3", "--config.seed=1"])
  assert r.returncode == 0, r.stderr[-3000:]
  shutil.rmtree(mine)
  shutil.copytree(other, mine)
  before = tree_digest(workdir)
  again = run_main(bts_args(tree, mine, workdir, "--config.bts.baseline=false", margins="0.0,0.1"))
  step = recorded["step"]
  assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == (
      f"eejax: error: {workdir} was trained so far with the backbone in {mine} (step {step}), and the backbone in "
      f"{mine} (step {step}) holds other weights. Nothing in it was changed: resume it with its own backbone "
      f"(backbone.json), or train with this one in a new --workdir"), again.stderr[-3000:]
  assert tree_digest(workdir) == before and not os.path.exists(os.path.join(workdir, "models", "boosted_m0.1"))


def test_bts_job_errors_are_one_line(backbone_run, tmp_path):
  root, tree, backbone = backbone_run
  cases = [(["--config.bts.backbone="], "needs --config.bts.backbone"),
           (["--config.bts.positions=2,9"], "must be increasing block numbers in 1..8"),
           (["--config.data.val_size=30"], "differs from the backbone run's")]
  for extra, message in cases:
    r = run_main(bts_args(tree, backbone, str(tmp_path / "w"), *extra))
    assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_the_grid_keeps_only_rows_of_its_own_settings(backbone_run, tmp_path):
  """A grid run again goes on from its rows; one with other settings, or another backbone, is refused."""
  root, tree, backbone = backbone_run
  workdir = str(tmp_path / "grid")

  def grid(*extra):
    args = [sys.executable, "launch/bts_grid.py", "--config", "configs/cifar10.py:bts", f"--workdir={workdir}",
            *bts_args(tree, backbone, workdir, "--config.bts.epochs=1", *extra)[3:]]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  first = grid()
  assert first.returncode == 0 and first.stdout.count("[16/16]") == 1, first.stderr[-3000:]
  report = json.load(open(os.path.join(workdir, "grid.json")))
  assert json.load(open(os.path.join(workdir, "config.json")))["bts"]["epochs"] == 1
  again = grid("--config.bts.positions=1,2", "--config.bts.head_width=3")  # the grid's own axes: not read
  assert again.returncode == 0 and "[" not in again.stdout.split("# BTS-EE grid")[0], again.stdout[-2000:]
  assert json.load(open(os.path.join(workdir, "grid.json")))["rows"] == report["rows"]
  rows = os.path.join(workdir, "rows")
  kept = {name: open(os.path.join(rows, name)).read() for name in os.listdir(rows)}
  for extra, line in (
      (["--config.bts.epochs=2"], f"{workdir} holds a BTS-EE run with other bts settings (epochs); use a new "
                                  f"--workdir (only bts.positions, bts.head_width, bts.margins and bts.baseline may "
                                  f"change on a rerun)"),
      (["--config.seed=1"], f"{workdir} holds a BTS-EE run of seed 0, not 1; use a new --workdir"),
      (["--config.data.val_size=30"], f"{workdir} holds a BTS-EE run with other data settings (val_size)")):
    r = grid(*extra)  # each was run and its rows mixed with the first grid's
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"bts_grid: error: {line}"), r.stderr
  assert {name: open(os.path.join(rows, name)).read() for name in os.listdir(rows)} == kept


def test_grid_position_sets():
  """The grid's four branch-position sets (its end to end run: tests/test_reproduce.py, stage bts)."""
  sys.path.insert(0, os.path.join(REPO, "launch"))
  import bts_grid  # pylint: disable=g-import-not-at-top
  assert bts_grid.position_sets(9) == [(2, 4, 7), (4, 7), (2, 4), (3, 6)]  # ResNet-20: 9 blocks
  assert bts_grid.position_sets(8) == [(2, 4, 6), (4, 6), (2, 4), (3, 5)]  # ResNet-18


def test_the_grid_table_never_shows_minus_zero():
  """A configuration whose branches answer nothing costs their heads' few MACs more than the backbone alone:
  -0.002% saved is shown as 0.0, not -0.0 (and its difference as +0.0)."""
  from eejax import bts  # pylint: disable=g-import-not-at-top
  row = {"positions": [1, 2], "head_width": 8, "margin": 0.1, "accuracy": 0.5, "macs": 1e6,
         "test": {"exit_share": [0.0, 0.0, 1.0]}}
  report = {"reference": {"accuracy": 0.5, "macs": 1e6}, "backbone_name": "resnet8", "backbone": "/b",
            "rows": [{**row, "mode": "boosted", "macs_reduction": -2e-5},
                     {**row, "mode": "nonboosted", "macs_reduction": -1e-5}]}
  md = bts.markdown(report)
  assert "| 0.0% | 0 / 0 / 100% |" in md and "| +0.00 | +0.0 |" in md and "-0.0" not in md, md

