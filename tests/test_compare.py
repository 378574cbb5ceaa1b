"""Runs pooled over seeds: the figures read from each report, mean ± std, Welch's interval, the table and errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from configs import cifar10
from conftest import REPO, TINY_RUN, make_tree
from eejax import compare
from eejax.errors import UserError


def fake_run(folder, seed, final, model="resnet8", early=0.5, fits_25=False, config=None):
  """A finished run's report.json and config.json (`config` and its seed), with made-up figures."""
  os.makedirs(folder)
  fitted = [{"budget": b, "per_exit": {"test_accuracy": final - 0.1 + b / 10, "test_macs_fraction": b + 0.01 * seed,
                                       "fits_budget_on_val": b > 0.25 or fits_25}} for b in (0.25, 0.5)]
  report = {"model": model, "dataset": "folder:x", "full_macs": 100,
            "exits": [{"exit": 1, "accuracy": early, "macs": 40}, {"exit": 2, "accuracy": final, "macs": 100}],
            "policies": {"max_prob": {"budgets": {"0.25": None, "0.5": final - 0.05, "1.0": final}}},
            "fitted_on_val": {"max_prob": fitted}}
  with open(os.path.join(folder, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f)
  with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
    json.dump({**(config or {}), "seed": seed}, f)


def test_figures_summaries_and_the_interval_against_scipy(tmp_path):
  a_final, b_final = [0.80, 0.82, 0.81], [0.85, 0.86, 0.88, 0.87]
  for seed, final in enumerate(a_final):
    fake_run(str(tmp_path / "a" / f"seed{seed}"), seed, final)
  for seed, final in enumerate(b_final):
    fake_run(str(tmp_path / "b" / f"seed{seed}"), seed, final)
  groups = [compare.expand(f"base={tmp_path}/a/seed*"), compare.expand(f"{tmp_path}/b/seed*")]
  assert groups[0][0] == "base" and groups[1][0] == f"{tmp_path}/b/seed*" and len(groups[1][1]) == 4
  result = compare.compare(groups)
  base, other = result["groups"]
  assert [r["seed"] for r in other["runs"]] == [0, 1, 2, 3]
  s = base["summary"]
  np.testing.assert_allclose(s["final exit"]["mean"], np.mean(a_final))
  np.testing.assert_allclose(s["final exit"]["std"], np.std(a_final, ddof=1))
  assert s["exit 1"] == {"mean": 0.5, "std": 0.0, "n": 3}
  assert s["best @25%"] == {"mean": None, "std": None, "n": 0}  # no setting within 25% in any run
  assert s["fitted 25%"]["n"] == 0 and s["fitted 50%"]["n"] == 3  # a budget no setting fits on val is left out
  np.testing.assert_allclose(s["fitted 50% MACs"]["mean"], 0.51)  # 0.5 + 0.01 * mean seed (1)
  # Welch's interval against scipy's own.
  w = other["final_vs_first"]
  reference = stats.ttest_ind(b_final, a_final, equal_var=False).confidence_interval(0.95)
  np.testing.assert_allclose([w["low"], w["high"]], [reference.low, reference.high], rtol=1e-9)
  np.testing.assert_allclose(w["difference"], np.mean(b_final) - np.mean(a_final))
  text = compare.markdown(result)
  mean, std = 100 * np.mean(a_final), 100 * np.std(a_final, ddof=1)
  assert f"| base | resnet8 | 3 (0, 1, 2) | {mean:.2f} ± {std:.2f} |" in text
  assert f"- {tmp_path}/b/seed*: +5.50 points [" in text and "]: better" in text


def test_a_gain_within_the_spread_and_single_runs(tmp_path):
  for seed, final in enumerate([0.80, 0.90]):
    fake_run(str(tmp_path / "a" / str(seed)), seed, final)
  for seed, final in enumerate([0.87, 0.85]):
    fake_run(str(tmp_path / "b" / str(seed)), seed, final)
  fake_run(str(tmp_path / "c" / "0"), 0, 0.99)
  result = compare.compare([compare.expand(f"{g}={tmp_path}/{g}/*") for g in "abc"])
  assert "- b: +1.00 points [" in compare.markdown(result) and "within the seeds' spread" in compare.markdown(result)
  assert result["groups"][2]["final_vs_first"] is None  # one run: no interval
  assert "| c | resnet8 | 1 (0) | 99.00 |" in compare.markdown(result)  # one run: no ± part


def test_mistakes_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="matches no folder"):
    compare.expand(f"x={tmp_path}/nothing*")
  os.makedirs(tmp_path / "unfinished")
  with pytest.raises(UserError, match="no report.json: not a finished run"):
    compare.compare([compare.expand(str(tmp_path / "unfinished"))])
  fake_run(str(tmp_path / "m" / "0"), 0, 0.8)
  fake_run(str(tmp_path / "m" / "1"), 1, 0.8, model="resnet20")
  with pytest.raises(UserError, match="pools runs of different models"):
    compare.compare([compare.expand(f"m={tmp_path}/m/*")])
  with pytest.raises(UserError, match="has no policy 'entropy': give --policy one of max_prob"):
    compare.compare([compare.expand(f"m={tmp_path}/m/0")], policy="entropy")
  fake_run(str(tmp_path / "bad"), 0, 0.8)
  (tmp_path / "bad" / "report.json").write_text("{\"exits\": [")
  with pytest.raises(UserError, match="damaged report.json"):
    compare.compare([compare.expand(str(tmp_path / "bad"))])
  fake_run(str(tmp_path / "list"), 0, 0.8)
  (tmp_path / "list" / "config.json").write_text("[1]")
  with pytest.raises(UserError, match=r"list/config.json is not an eejax config \(not a JSON object\)"):
    compare.compare([compare.expand(str(tmp_path / "list"))])
  with pytest.raises(UserError) as e:  # was a row with an empty name
    compare.expand(f"={tmp_path}/m/0")
  assert str(e.value) == f"'={tmp_path}/m/0' gives its group no label: give LABEL=GLOB, e.g. joint='R/joint/seed*'"
  with pytest.raises(UserError) as e:  # was two rows and two curves named m
    compare.compare([compare.expand(f"m={tmp_path}/m/0"), compare.expand(f"n={tmp_path}/bad"),
                     compare.expand(f"m={tmp_path}/list")])
  assert str(e.value) == ("group 'm' is given twice: give each group once, its glob matching all its runs "
                          "(m='R/m/seed*'), or give the two their own labels")


def test_a_group_pools_one_run_over_seeds_and_each_seed_once(tmp_path):
  smoke = json.loads(cifar10.get_config("smoke").to_json_best_effort())

  def settings(**changes):
    config = json.loads(json.dumps(smoke))
    for key, value in changes.items():
      section, name = key.split("__")
      config[section][name] = value
    return config

  fake_run(str(tmp_path / "a" / "0"), 0, 0.8, config=smoke)
  fake_run(str(tmp_path / "a" / "1"), 1, 0.8, config=settings(
      data__source="folder:/elsewhere", erde__teacher="/t1", checkpoint__every_steps=7, eval__batch_size=8,
      train__steps_per_call=5, mate__kd_weight=3.0))  # how each job ran, and settings a joint run never reads
  assert len(compare.compare([compare.expand(f"a={tmp_path}/a/*")])["groups"][0]["runs"]) == 2
  fake_run(str(tmp_path / "a" / "2"), 2, 0.8, config=settings(train__epochs=30, train__learning_rate=0.4))
  with pytest.raises(UserError) as e:
    compare.compare([compare.expand(f"a={tmp_path}/a/*")])
  assert str(e.value) == (
      f"group 'a' pools runs that differ in more than their seed (train.epochs: 2 in {tmp_path}/a/0, 30 in "
      f"{tmp_path}/a/2; train.learning_rate: 0.05 in {tmp_path}/a/0, 0.4 in {tmp_path}/a/2); give each its own group")
  for key, value in (("eval__budgets", [0.5]), ("data__val_seed", 1), ("init_from", "/w")):
    fake_run(str(tmp_path / key / "0"), 0, 0.8, config=smoke)
    changed = {**smoke, key: value} if "__" not in key else settings(**{key: value})
    fake_run(str(tmp_path / key / "1"), 1, 0.8, config=changed)
    with pytest.raises(UserError, match=f"{key.replace('__', '.')}: "):
      compare.compare([compare.expand(f"g={tmp_path}/{key}/*")])
  fake_run(str(tmp_path / "twice" / "0"), 3, 0.8, config=smoke)
  fake_run(str(tmp_path / "twice" / "1"), 3, 0.8, config=smoke)
  with pytest.raises(UserError, match=rf"group 't' holds seed 3 twice \({tmp_path}/twice/0 and {tmp_path}/twice/1\)"):
    compare.compare([compare.expand(f"t={tmp_path}/twice/*")])
  for seed in (0, 1):  # runs written before config.json: nothing to compare, no seed to count
    fake_run(str(tmp_path / "old" / str(seed)), seed, 0.8)
    os.remove(tmp_path / "old" / str(seed) / "config.json")
  pooled = compare.compare([compare.expand(f"o={tmp_path}/old/*")])["groups"][0]["runs"]
  assert [r["seed"] for r in pooled] == [None, None]


def write_history(folder, steps, accuracies, epochs_per_step=0.2):
  """metrics.jsonl with training lines and the final (second) exit's validation accuracy at `steps`."""
  with open(os.path.join(folder, "metrics.jsonl"), "w", encoding="utf-8") as f:
    for step, acc in zip(steps, accuracies):
      f.write(json.dumps({"step": step, "train/loss": 1.0}) + "\n")
      f.write(json.dumps({"step": step, "val/epoch": step * epochs_per_step, "val/accuracy_exit1": 0.1,
                          "val/accuracy_exit2": acc}) + "\n")


def test_validation_curves_pool_over_the_steps_every_run_validated(tmp_path):
  for seed, accs in enumerate([[0.5, 0.6, 0.7], [0.4, 0.7, 0.8, 0.9]]):  # the second run validated once more
    fake_run(str(tmp_path / "a" / f"s{seed}"), seed, 0.8)
    write_history(str(tmp_path / "a" / f"s{seed}"), [5, 10, 15, 20][:len(accs)], accs)
  fake_run(str(tmp_path / "b" / "s0"), 0, 0.8)  # a run from before validation during training: no curve
  result = compare.compare([compare.expand(f"a={tmp_path}/a/s*"), compare.expand(f"b={tmp_path}/b/s*")])
  curve = result["groups"][0]["val_curve"]
  assert curve["epochs"] == [1.0, 2.0, 3.0] and curve["runs"] == 2
  np.testing.assert_allclose(curve["mean"], [0.45, 0.65, 0.75])
  np.testing.assert_allclose(curve["std"], [np.std([0.5, 0.4], ddof=1)] * 3)
  assert result["groups"][1]["val_curve"] is None
  compare.write(result, str(tmp_path / "out"))
  assert (tmp_path / "out" / "compare_training.png").exists() and (tmp_path / "out" / "compare_training.pdf").exists()
  assert "compare_training.png" in (tmp_path / "out" / "compare.md").read_text()


def test_the_command_writes_the_table_and_the_figure_or_one_line(tmp_path):
  for seed in range(2):
    fake_run(str(tmp_path / "r" / f"s{seed}"), seed, 0.8 + seed / 100)
  out = tmp_path / "out"
  done = subprocess.run([sys.executable, "-m", "eejax.compare", f"--out={out}", f"runs={tmp_path}/r/s*"], cwd=REPO,
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  assert "| runs | resnet8 | 2 (0, 1) | 80.50 ± 0.71 |" in done.stdout
  assert sorted(os.listdir(out)) == ["compare.json", "compare.md", "compare.pdf", "compare.png",
                                  "compare.tex"]
  assert r"runs & resnet8 & 2 (0, 1) & 80.50 $\pm$ 0.71" in (out / "compare.tex").read_text()
  assert json.loads((out / "compare.json").read_text())["groups"][0]["final"] == [0.8, 0.81]
  failed = subprocess.run([sys.executable, "-m", "eejax.compare", f"x={tmp_path}/none*"], cwd=REPO,
                          capture_output=True, text=True, check=False)
  assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
      f"eejax.compare: error: '{tmp_path}/none*' matches no folder: give LABEL=GLOB of finished runs, "
      "e.g. joint='R/joint/seed*'"]
  (tmp_path / "a_file").write_text("")
  failed = subprocess.run([sys.executable, "-m", "eejax.compare", f"--out={tmp_path}/a_file", f"runs={tmp_path}/r/s*"],
                          cwd=REPO, capture_output=True, text=True, check=False)
  assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [  # was "File exists: ..."
      f"eejax.compare: error: --out={tmp_path}/a_file is a file, not a folder: give the comparison a folder's path "
      "(new or existing)"]


def test_a_launcher_runs_every_scheme_over_seeds_and_pools_them(tmp_path):
  tree = str(tmp_path / "tree")
  make_tree(tree, per_class=(16, 8), size=16)
  root = str(tmp_path / "sd")
  done = subprocess.run([sys.executable, "launch/self_distillation.py", "--scale=cpu", f"--data=folder:{tree}",
                         f"--root={root}", "--seeds=2", "--", *TINY_RUN], cwd=REPO, capture_output=True, text=True,
                        timeout=900, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  for scheme in ("joint", "byot", "mate"):
    for workdir, seed in ((scheme, 0), (f"{scheme}_seed1", 1)):
      assert json.load(open(os.path.join(root, workdir, "config.json")))["seed"] == seed
  pooled = json.load(open(os.path.join(root, "compare.json")))
  assert [(g["label"], len(g["runs"])) for g in pooled["groups"]] == [("joint", 2), ("byot", 2), ("mate", 2)]
  final = [json.load(open(os.path.join(root, w, "report.json")))["exits"][-1]["accuracy"]
           for w in ("mate", "mate_seed1")]
  np.testing.assert_allclose(pooled["groups"][2]["summary"]["final exit"]["mean"], np.mean(final))
  assert "--seeds 2" in pooled["command"] and "- mate: " in open(os.path.join(root, "compare.md")).read()
  launch = lambda *more: subprocess.run(
      [sys.executable, "launch/self_distillation.py", "--scale=cpu", f"--data=folder:{tree}", f"--root={root}",
       "--seeds=2", "--", *TINY_RUN, *more], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  again = launch()  # the same command: every run is finished, none runs again
  assert again.returncode == 0 and again.stdout.count("done already") == 6, again.stdout[-3000:]
  other = launch("--config.train.learning_rate=0.01")  # reported the first runs as these, before
  assert other.returncode != 0 and "done already" not in other.stdout, other.stdout[-3000:]
  assert ("holds a run started with other training settings (train.learning_rate: 0.2 there, 0.01 here)"
          in other.stderr), other.stderr[-3000:]
  assert other.stderr.strip().splitlines()[-1] == ("[joint] stopped with status 2: do what its error line above "
                                                   "says, then run this command again (finished runs are kept)")
  sys.path.insert(0, os.path.join(REPO, "launch"))
  import runs  # pylint: disable=g-import-not-at-top
  import self_distillation  # pylint: disable=g-import-not-at-top
  overrides = [f"--config.data.source=folder:{tree}", *self_distillation.SCALES["cpu"]["extra"], *TINY_RUN]
  config, joint = os.path.join(REPO, "configs", "cifar10.py:joint_cpu"), os.path.join(root, "joint")
  assert runs.finished(joint, config, overrides)
  assert runs.finished(joint, config, [*overrides, "--config.log.every_s=5", "--config.eval.batch_size=12"])
  for changed in ("--config.eval.budgets=0.5", "--config.train.epochs=2", f"--config.data.source=folder:{root}"):
    assert not runs.finished(joint, config, [*overrides, changed]), changed  # the job evaluates again, or refuses
  assert not runs.finished(joint, config, [*overrides, "--config.nope=1"])  # the job says what is wrong
