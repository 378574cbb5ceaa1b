"""End-to-end training on tiny made-up trees: the report, resume, signals, devices, NaN, init_from."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, read_events, run_main, smoke_args
from configs import cifar10
from eejax import history, run, signals, state, train
from eejax.errors import UserError


def smoke_config(tree, cache_dir, **overrides):
  config = cifar10.get_config("smoke")
  config.data.source = f"folder:{tree}"
  config.data.cache_dir = cache_dir
  config.data.val_size = 8
  config.log.every_s = 1e9
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def params_of(workdir, collections=("params", "batch_stats")):
  variables = run.load_run(workdir).variables
  return jax.tree.leaves(jax.device_get({c: variables[c] for c in collections}))


def test_train_writes_the_report_and_learns(tiny_tree, tmp_path):
  workdir = str(tmp_path / "w")
  config = smoke_config(tiny_tree, str(tmp_path / "c"), **{"train.epochs": 12, "train.learning_rate": 0.1})
  result = train.train_and_evaluate(config, workdir)
  for name in ("report.json", "report.md", "curve.png", "config.json", "run.json", "metrics.jsonl", "logits.npz"):
    assert os.path.exists(os.path.join(workdir, name)), name
  saved = json.load(open(os.path.join(workdir, "report.json"), encoding="utf-8"))
  assert saved["method"] == "joint"
  assert [e["exit"] for e in saved["exits"]] == [1, 2, 3]
  assert {"threshold", "accuracy", "macs"} <= set(saved["policies"]["max_prob"]["curve"][0])
  assert set(saved["policies"]["max_prob"]["budgets"]) == {"0.25", "0.5", "0.75", "1.0"}
  assert set(saved["policies"]) == {"max_prob", "entropy", "patience"}
  assert [r["budget"] for r in saved["fitted_on_val"]["max_prob"]] == [0.25, 0.5, 0.75]
  assert len(saved["calibration"]["temperature"]) == 3
  assert saved["real_inference"]["exit_mismatches_vs_simulated"] == 0
  # The classes differ in brightness: the final exit must beat chance (1/3) clearly.
  assert result["exits"][-1]["accuracy"] > 0.6
  logits = np.load(os.path.join(workdir, "logits.npz"))
  assert logits["test_logits"].shape == (3, 24, 3)
  lines = open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8").read().splitlines()
  assert json.loads(lines[-1])["test/accuracy_exit3"] == result["exits"][-1]["accuracy"]
  assert json.loads(lines[0])["train/learning_rate"] > 0
  assert config.train.transfer_guard == "disallow"  # the loop above ran with host-to-device copies disallowed
  # Validation during training: at the first chunk boundary (2 steps) on or after each epoch (5 steps), and at
  # the end; the last scores are the final weights', the same as the report's validation logits.
  val = [json.loads(l) for l in lines if '"val/epoch"' in l]
  assert [v["step"] for v in val] == [6, 10, 16, 20, 26, 30, 36, 40, 46, 50, 56, 60]
  assert [v["val/epoch"] for v in val][:2] == [6 / 5, 2.0]
  for e in range(3):
    assert val[-1][f"val/accuracy_exit{e + 1}"] == np.mean(np.argmax(logits["val_logits"][e], -1) == logits["val_labels"])
  assert [r["exit"] for r in saved["history"]] == [1, 2, 3] and saved["history"][2]["points"] == 12
  assert "## Validation during training" in open(os.path.join(workdir, "report.md"), encoding="utf-8").read()
  assert os.path.exists(os.path.join(workdir, "training.png")) and os.path.exists(os.path.join(workdir, "training.pdf"))


def test_validation_during_training_can_be_turned_off(tiny_tree, tmp_path):
  workdir = str(tmp_path / "w")
  result = train.train_and_evaluate(smoke_config(tiny_tree, str(tmp_path / "c"), **{"eval.every_epochs": 0.0}),
                                    workdir)
  assert result["history"] == [] and not os.path.exists(os.path.join(workdir, "training.png"))
  assert "val/" not in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8").read()
  assert "Validation during training" not in open(os.path.join(workdir, "report.md"), encoding="utf-8").read()


def test_the_transfer_guard_catches_a_host_copy_in_the_loop(tiny_tree, tmp_path, monkeypatch):
  # If the training data stayed on the host, every call would copy it to the device: the guard must stop it.
  monkeypatch.setattr(train.sharding, "put_replicated", lambda x, mesh: x)
  with pytest.raises(Exception, match="(?i)disallowed host-to-device transfer"):
    train.train_and_evaluate(smoke_config(tiny_tree, str(tmp_path / "c")), str(tmp_path / "w"))


def test_restart_resumes_and_nan_stops_with_the_step(tiny_tree, tmp_path):
  workdir = str(tmp_path / "w")
  config = smoke_config(tiny_tree, str(tmp_path / "c"))
  train.train_and_evaluate(config, workdir)
  first = params_of(workdir)
  config.train.epochs = 3  # a longer schedule continues from the saved step, not from 0
  train.train_and_evaluate(config, workdir)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == 3 * (88 // 16) and any(a.shape and not np.array_equal(a, b)
                                                  for a, b in zip(first, params_of(workdir)))
  # The history runs on across the two jobs: validated after epochs 1.2 and 2 (the first job's end), then 3.
  rows = history.summary(history.read(workdir))
  assert [r["points"] for r in rows] == [3, 3, 3] and rows[0]["final_epoch"] == 3.0
  assert history.series(history.read(workdir), "val/epoch")[1].tolist() == [6 / 5, 2.0, 3.0]
  # Step 1's loss comes from the initial parameters; its NaN update makes step 2's loss the first NaN.
  nan = smoke_config(tiny_tree, str(tmp_path / "c"), **{"train.learning_rate": float("nan"), "train.steps_per_call": 1})
  with pytest.raises(UserError, match=r"loss became nan at step 2; .*no checkpoint yet.*learning_rate"):
    train.train_and_evaluate(nan, str(tmp_path / "nan"))
  # What came before the bad step is on disk in both metric files (TensorBoard's is flushed only when closed).
  assert [json.loads(l)["step"] for l in open(tmp_path / "nan" / "metrics.jsonl", encoding="utf-8")] == [1]
  assert [(step, tag) for step, tag, _ in read_events(tmp_path / "nan" / "tb") if tag == "train/loss"] == [
      (1, "train/loss")]


def test_a_stop_at_a_validation_boundary_validates_first_on_resume(tiny_tree, tmp_path, monkeypatch):
  # The stop saves at once; the resumed run scores step 6's weights before training on, so its history is the
  # uninterrupted run's: validated at 6 (the first 2-step chunk boundary after epoch 1) and 10.
  real, calls = train.make_train_chunk, []

  def stopping(*args):
    chunk = real(*args)

    def call(*inputs):
      out = chunk(*inputs)
      calls.append(1)
      if len(calls) == 3:  # a SIGTERM during the chunk that ends at step 6
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    return call

  monkeypatch.setattr(train, "make_train_chunk", stopping)
  config, workdir = smoke_config(tiny_tree, str(tmp_path / "c")), str(tmp_path / "w")
  with pytest.raises(signals.Stopped, match="stopped by SIGTERM at step 6"):
    train.train_and_evaluate(config, workdir)
  assert history.series(history.read(workdir), "val/epoch")[0].tolist() == []
  monkeypatch.undo()
  train.train_and_evaluate(config, workdir)
  train.train_and_evaluate(config, str(tmp_path / "ref"))
  got, want = history.read(workdir), history.read(str(tmp_path / "ref"))
  assert history.series(got, "val/epoch")[0].tolist() == [6, 10]
  for e in (1, 2, 3):
    np.testing.assert_array_equal(history.series(got, f"val/accuracy_exit{e}")[1],
                                  history.series(want, f"val/accuracy_exit{e}")[1])


def test_init_from_checks_the_model(tiny_tree, tmp_path):
  source = str(tmp_path / "src")
  train.train_and_evaluate(smoke_config(tiny_tree, str(tmp_path / "c"), **{"train.epochs": 1}), source)
  config = smoke_config(tiny_tree, str(tmp_path / "c"), **{"init_from": source, "train.epochs": 1,
                                                            "train.learning_rate": 0.0})
  train.train_and_evaluate(config, str(tmp_path / "b"))
  for a, b in zip(params_of(source, ["params"]), params_of(str(tmp_path / "b"), ["params"])):
    np.testing.assert_array_equal(a, b)  # lr 0: the parameters (not the BN statistics) are the source's
  # Zero epochs from another run's weights score those weights as they are, and the report says so.
  config = smoke_config(tiny_tree, str(tmp_path / "c"), **{"init_from": source, "train.epochs": 0})
  got = train.train_and_evaluate(config, str(tmp_path / "e"))
  want = json.load(open(os.path.join(source, "report.json"), encoding="utf-8"))
  assert [e["accuracy"] for e in got["exits"]] == [e["accuracy"] for e in want["exits"]]
  text = open(os.path.join(tmp_path / "e", "report.md"), encoding="utf-8").read()
  assert f"Not trained here (train.epochs=0): the weights of `{source}` as they are." in text
  assert "Not trained here" not in open(os.path.join(source, "report.md"), encoding="utf-8").read()
  config = smoke_config(tiny_tree, str(tmp_path / "c"), **{"init_from": source, "model.width": 0.5})
  with pytest.raises(UserError, match="holds a different model"):
    train.train_and_evaluate(config, str(tmp_path / "d"))


def _wait_for_checkpoint(workdir, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    folder = os.path.join(workdir, "checkpoints")
    if os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder)):
      return
    time.sleep(0.2)
  raise AssertionError(f"no checkpoint appeared: {proc.poll()}")


def test_sigterm_then_restart_equals_an_uninterrupted_run(tiny_tree, tmp_path):
  cache = str(tmp_path / "c")
  extra = ["--config.train.epochs=60", "--config.checkpoint.every_steps=20"]
  interrupted, reference = str(tmp_path / "int"), str(tmp_path / "ref")
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen([sys.executable, "-m", "eejax.main", *smoke_args(tiny_tree, interrupted, cache, *extra)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(interrupted, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err
  assert "stopped by SIGTERM at step" in err and "Traceback" not in err
  stopped_at = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert 0 < stopped_at < 300
  resumed = run_main(smoke_args(tiny_tree, interrupted, cache, *extra))
  assert resumed.returncode == 0, resumed.stderr
  assert f"resuming from {interrupted} at step {stopped_at}" in resumed.stdout
  assert run_main(smoke_args(tiny_tree, reference, cache, *extra)).returncode == 0
  for a, b in zip(params_of(interrupted), params_of(reference)):
    np.testing.assert_array_equal(a, b)


def test_two_devices_match_one(smoke_master, tmp_path):
  _, tree, one_device, stdout = smoke_master
  assert "on 1 cpu device(s)" in stdout
  two_devices = str(tmp_path / "d2")
  out = run_main(smoke_args(tree, two_devices, "", "--config.eval.real_inference=False"),
                 env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert out.returncode == 0, out.stderr
  assert "on 2 cpu device(s)" in out.stdout
  for a, b in zip(params_of(one_device), params_of(two_devices)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_one_step_chunks_equal_a_two_step_scan():
  import functools  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from eejax import sharding  # pylint: disable=g-import-not-at-top
  config = cifar10.get_config("smoke")
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  model = run.build_model(config.model, 3)
  tx = state.make_optimizer(config.train, state.make_schedule(config.train, 4))
  rng = np.random.default_rng(0)
  data_dev = {"images": jnp.asarray(rng.integers(0, 255, (64, 16, 16, 3), dtype=np.uint8)),
              "labels": jnp.asarray(rng.integers(0, 3, 64).astype(np.int32)), "mean": jnp.full(3, 0.5),
              "std": jnp.full(3, 0.25)}
  keys = (jax.random.key(1), jax.random.key(2))
  step_fn = functools.partial(train.train_step, model=model, tx=tx, loss_fn=train.make_loss_fn(config, 3),
                              batch_size=16, crop_pad=4, flip=True, batch_sharding=sharding.batch_sharded(mesh))
  fresh = lambda: jax.device_put(state.init_state(model, tx, jax.random.key(0), (16, 16, 3)), rep)
  one, two = train.make_train_chunk(step_fn, 1, rep), train.make_train_chunk(step_fn, 2, rep)
  a, m1 = one(fresh(), data_dev, keys, None)
  a, m2 = one(a, data_dev, keys, None)
  b, m12 = two(fresh(), data_dev, keys, None)
  assert int(a.step) == int(b.step) == 2
  np.testing.assert_allclose(np.concatenate([m1["loss"], m2["loss"]]), m12["loss"], rtol=1e-6)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
