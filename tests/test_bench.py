"""The benchmark scripts: they run on a finished run, agree with its report, and a mistake is one line.

The timings themselves are never asserted (they are the scripts' output, not a property of the code); what is
checked is that the figures they print are computed from the right things, so that an accelerator session
finds them working.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, copy_run, run_main, smoke_args


def bench(script, *args):
  """`python bench/SCRIPT ARGS` from the repository root, as the README gives it: no PYTHONPATH (with the root on
  it, a script that could not import configs/ by itself passed here and failed for its users)."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONUNBUFFERED": "1"}
  return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, check=False)


def test_early_exit_predicts_the_speedup_from_the_exits_it_took(smoke_run):
  _, _, workdir = smoke_run
  r = bench("early_exit.py", "--workdir", workdir, "--batch-size", "8", "--repeats", "1")
  assert r.returncode == 0, r.stderr[-2000:]
  report = json.load(open(os.path.join(workdir, "report.json"), encoding="utf-8"))
  taken_E = np.array(json.loads(re.search(r"exits taken: (\[.*\])", r.stdout).group(1)))
  assert taken_E.sum() == report["splits"]["test"] // 8 * 8 and len(taken_E) == len(report["exits"])
  cumulative_E = np.array([e["macs"] for e in report["exits"]], np.float64)
  predicted = report["full_macs"] / (taken_E @ cumulative_E / taken_E.sum())
  assert float(re.search(r"MACs-predicted speedup: ([\d.]+)x", r.stdout).group(1)) == pytest.approx(predicted, abs=0.006)
  assert "hardware: " in r.stdout and re.search(r"measured speedup\s*:\s*[\d.]+x", r.stdout)


def test_early_exit_reads_a_moved_dataset_where_data_says(smoke_master, tmp_path):
  tree, workdir = copy_run(smoke_master, str(tmp_path), own_tree=True)
  os.rename(tree, str(tmp_path / "moved"))
  r = bench("early_exit.py", "--workdir", workdir, "--batch-size", "8", "--repeats", "1")
  assert r.returncode == 2 and r.stderr.startswith("bench/early_exit.py: error: "), r.stderr[-2000:]
  assert "give --data=SOURCE" in r.stderr
  r = bench("early_exit.py", "--workdir", workdir, "--batch-size", "8", "--repeats", "1",
            "--data", f"folder:{tmp_path / 'moved'}")
  assert r.returncode == 0, r.stderr[-2000:]
  test_images = json.load(open(os.path.join(workdir, "report.json"), encoding="utf-8"))["splits"]["test"]
  assert sum(json.loads(re.search(r"exits taken: (\[.*\])", r.stdout).group(1))) == test_images // 8 * 8


def test_threshold_search_agrees_with_the_loops_on_a_runs_logits(smoke_run):
  _, _, workdir = smoke_run
  r = bench("threshold_search.py", "--logits", os.path.join(workdir, "logits.npz"), "--settings", "7")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "identical accuracy and MACs in all three: True" in r.stdout
  assert re.search(r"MSDNet/SDN loop \(peer\)\s*:.*ratio peer / eejax:\s*[\d.]+x", r.stdout)


def number(text):
  return float(text.replace(",", ""))


def test_input_pipeline_and_step_breakdown_print_shares_of_the_step_they_measured():
  tiny = ["--model", "resnet8", "--width", "0.25", "--batch", "8"]
  r = bench("input_pipeline.py", *tiny, "--images", "256")
  assert r.returncode == 0, r.stderr[-2000:]
  alone = number(re.search(r"normalise alone:\s*([\d,]+) images/s", r.stdout).group(1))
  step = number(re.search(r"training step \(resnet8 x0.25\)\s*:\s*([\d,]+) images/s", r.stdout).group(1))
  headroom = float(re.search(r"([\d.]+)x headroom", r.stdout).group(1))
  assert headroom == pytest.approx(alone / step, rel=2e-3, abs=0.06)
  r = bench("step_breakdown.py", *tiny, "--steps", "2")
  assert r.returncode == 0, r.stderr[-2000:]
  parts = re.findall(r"\(([a-e])\) [^:]+:\s*([\d.]+) ms\s+([\d.]+)% of the step\s+\(\s*([\d,]+) images/s\)", r.stdout)
  assert [p[0] for p in parts] == list("abcde")
  step_ms = float(parts[0][1])
  for _, ms, share, rate in parts:  # each share and rate computed from the part's own time
    assert float(share) == pytest.approx(100 * float(ms) / step_ms, abs=0.06)
    assert number(rate) == pytest.approx(8 / (float(ms) / 1e3), rel=6e-4 / float(ms) + 1e-3, abs=1)  # ms: 3 decimals


@pytest.mark.parametrize("script, args, words", [
    ("early_exit.py", ["--workdir", "/no/such/run"], "is not an eejax workdir"),
    ("threshold_search.py", ["--logits", "/no/such/logits.npz"], "/no/such/logits.npz is missing"),
    ("train_step.py", ["--models", "resnet99", "--steps", "1"], "unknown model 'resnet99'"),
    ("erde_step.py", ["--teacher", "resnet99"], "unknown model 'resnet99'"),
    ("depthwise.py", ["--channels", "0"], "argument --channels: '0' is not a positive int"),
    ("train_step.py", ["--batch", "-4"], "argument --batch: '-4' is not a positive int"),
    ("erde_step.py", ["--student-width", "abc"], "argument --student-width: 'abc' is not a positive float"),
    ("threshold_search.py", ["--exits", "3"], "unrecognized arguments: --exits 3"),
])
def test_a_mistake_is_one_line_and_status_2(script, args, words):
  r = bench(script, *args)
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 2, r.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith(f"bench/{script}: error: ") and words in lines[0], r.stderr


@pytest.mark.parametrize("arch, width", [("mobilenet", 0.25), ("resnet8", 0.5), ("vgg16", 0.125), ("wrn32_4", 0.25)])
def test_the_pytorch_peer_computes_the_same_function(arch, width):
  # What bench/train_step.py checks before timing the two: eejax's weights copied into the peer give the same
  # training-mode joint loss (BatchNorm on the batch, every exit), MobileNet's depthwise convolutions, VGG's
  # max-pools and three-layer classifier, and the Wide ResNet's pre-activation blocks included.
  pytest.importorskip("torch", reason="the PyTorch peer needs torch (pip install -e '.[bench]')")
  sys.path.insert(0, os.path.join(REPO, "bench"))
  import train_step  # pylint: disable=g-import-not-at-top
  ours, theirs = train_step.same_function(arch, width)
  assert ours == pytest.approx(theirs, rel=1e-5) and ours > 1.0


def test_the_peer_can_start_from_flaxs_kernel_distribution():
  # bench/accuracy_parity.py --peer-flax-init: every kernel of the peer drawn as flax draws eejax's (lecun_normal),
  # every bias 0; compared with flax's own initializer on the same shapes.
  torch = pytest.importorskip("torch", reason="the PyTorch peer needs torch (pip install -e '.[bench]')")
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, "bench"))
  import torch_peer  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  peer = torch_peer.build("vgg16", 0.5, flax_init=True)
  layers = [m for m in peer.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
  assert len(layers) == 13 + 5 + 2  # convolutions, exits, the classifier's two hidden layers
  for m in layers:
    w = m.weight.detach().numpy()
    if w.ndim == 4:  # OIHW -> HWIO, flax's layout: fan_in is everything but the output channels
      w = w.transpose(2, 3, 1, 0)
    else:
      w = w.T
    want = np.asarray(nn.initializers.lecun_normal()(jax.random.key(0), w.shape))
    if w.size >= 2000:
      assert np.std(w) == pytest.approx(np.std(want), rel=0.1), w.shape
    bound = 2 / np.sqrt(np.prod(w.shape[:-1])) / 0.87962566103423978
    assert np.abs(w).max() <= bound * (1 + 1e-6) and np.abs(want).max() <= bound * (1 + 1e-6)
    assert m.bias is None or not m.bias.detach().numpy().any()
  default = [m.weight.detach().numpy().std() for m in torch_peer.build("vgg16", 0.5).modules()
             if isinstance(m, torch.nn.Conv2d)]
  flax_std = [m.weight.detach().numpy().std() for m in layers if m.weight.ndim == 4]
  assert np.median(np.array(flax_std) / np.array(default)) > 1.5  # PyTorch's own draw is sqrt(3) times narrower


@pytest.mark.parametrize("decay_on", ["kernels", "all"])
def test_a_peer_training_step_is_an_eejax_training_step(decay_on):
  # From the same weights and batch, bench/accuracy_parity.py's peer step (label-smoothed joint loss, SGD with
  # Nesterov momentum, coupled weight decay on kernels only or, as PyTorch's SGD does by default, on every
  # parameter, the schedule's rate) and eejax's train_step give the same exit losses and, three steps on, the same
  # weights and BatchNorm statistics. Weight decay is set large here so that decaying the wrong tensors, or
  # decoupled, would show.
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  from eejax import sharding, train  # pylint: disable=g-import-not-at-top
  config = cifar10.get_config("smoke")
  b = 16
  config.train.update(learning_rate=0.4, warmup_epochs=1.0, epochs=4, label_smoothing=0.1, weight_decay=0.02,
                      batch_size=b, exit_weights=(0.5, 1.0, 2.0), weight_decay_on=decay_on)
  config = config.copy_and_resolve_references()
  pytest.importorskip("torch", reason="the PyTorch peer needs torch (pip install -e '.[bench]')")
  sys.path.insert(0, os.path.join(REPO, "bench"))
  import accuracy_parity  # pylint: disable=g-import-not-at-top
  from eejax import run, state  # pylint: disable=g-import-not-at-top
  model = run.build_model(config.model, 10)
  tx = state.make_optimizer(config.train, state.make_schedule(config.train, 1))
  s = state.init_state(model, tx, jax.random.key(0), (32, 32, 3))
  import torch  # pylint: disable=g-import-not-at-top
  import torch_peer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, b).astype(np.int32)
  mean_C, std_C = np.float32([0.5, 0.4, 0.3]), np.float32([0.25, 0.2, 0.3])
  peer = torch_peer.build("resnet8", config.model.width)
  torch_peer.load_flax(peer, jax.device_get({"params": s.params, "batch_stats": s.batch_stats}))
  mesh = sharding.make_mesh()
  step = jax.jit(functools.partial(  # the whole set is one batch, so its order does not matter; no augmentation
      train.train_step, model=model, tx=tx, loss_fn=train.make_loss_fn(config, 3), batch_size=b, crop_pad=0,
      flip=False, batch_sharding=sharding.batch_sharded(mesh)))
  data_dev = {"images": jnp.asarray(images), "labels": jnp.asarray(labels), "mean": mean_C, "std": std_C}
  opt = accuracy_parity.peer_optimizer(peer, config.train)
  x = accuracy_parity.to_input(torch.from_numpy(images), torch.from_numpy(mean_C), torch.from_numpy(std_C))
  weights_E = torch.tensor(config.train.exit_weights)
  peer.train()
  first = {k: v.clone() for k, v in peer.state_dict().items()}
  for k in range(3):
    s, metrics = step(s, data_dev, train.run_keys(0)[1:], None)
    ce_E = accuracy_parity.peer_step(peer, opt, x, torch.from_numpy(labels.astype(np.int64)), weights_E,
                                     config.train, accuracy_parity.learning_rate(k, config.train, 1), bf16=False)
    np.testing.assert_allclose(ce_E.numpy(), np.asarray(metrics["ce_E"]), rtol=2e-5)
  ours = torch_peer.build("resnet8", config.model.width)
  torch_peer.load_flax(ours, jax.device_get({"params": s.params, "batch_stats": s.batch_stats}))
  moved = 0
  for name, theirs in peer.state_dict().items():
    if not theirs.dtype.is_floating_point:
      continue
    want = ours.state_dict()[name].numpy()
    # PyTorch keeps the running variance unbiased (n/(n-1) of the batch's, n >= 16 * 8 * 8 here): the one difference
    rtol = 2e-3 if name.endswith("running_var") else 1e-4
    np.testing.assert_allclose(theirs.numpy(), want, rtol=rtol, atol=1e-6 * np.abs(want).max(), err_msg=name)
    moved += not np.allclose(first[name].numpy(), want)
  assert moved >= 0.9 * sum(v.dtype.is_floating_point for v in first.values())  # the steps moved nearly everything


def test_the_peers_own_draws_match_eejaxs_tensor_by_tensor():
  # --peer-zero-init --peer-flax-init: over 8 seeds of each, every parameter and BatchNorm statistic of the ResNet-18
  # x0.25 (the CPU parity run's model) has the same mean, standard deviation, largest value and kurtosis in the
  # peer's draws as in eejax's (a plain normal, PyTorch's uniform, or a missed zero scale would each differ).
  torch = pytest.importorskip("torch", reason="the PyTorch peer needs torch (pip install -e '.[bench]')")
  sys.path.insert(0, os.path.join(REPO, "bench"))
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import torch_peer  # pylint: disable=g-import-not-at-top
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  from eejax import run, state  # pylint: disable=g-import-not-at-top
  config = cifar10.get_config()
  config.model.width = 0.25
  model = run.build_model(config.model, 10)
  init = jax.jit(lambda key: state.init_state(model, optax.identity(), key, (32, 32, 3)))
  ours, theirs = {}, {}
  for seed in range(8):
    s = jax.device_get(init(jax.random.key(seed)))
    peer = torch_peer.build("resnet18", 0.25)
    torch_peer.load_flax(peer, {"params": s.params, "batch_stats": s.batch_stats})
    torch.manual_seed(seed)
    for draws, m in ((ours, peer), (theirs, torch_peer.build("resnet18", 0.25, zero_init_residual=True,
                                                             flax_init=True))):
      for name, v in m.state_dict().items():
        if v.dtype.is_floating_point:
          draws.setdefault(name, []).append(v.numpy().ravel())

  def moments(x):
    x = np.concatenate(x)
    sd = x.std()
    return np.array([x.mean(), sd, np.abs(x).max() / sd if sd else 0, ((x - x.mean())**4).mean() / sd**4 if sd else 0])

  assert len(ours) == len(theirs) > 100
  kernels = 0
  for name in ours:
    a, b = moments(ours[name]), moments(theirs[name])
    n = sum(x.size for x in ours[name])
    assert abs(b[0] - a[0]) <= 4 * a[1] / np.sqrt(n) + 1e-7, name  # means within 4 standard errors
    np.testing.assert_allclose(b[1:], a[1:], rtol=max(0.02, 3 / np.sqrt(n)), err_msg=name)  # a 1,280-value head: 8%
    kernels += a[1] > 0
  assert kernels == 1 + 16 + 3 + 4  # stem, blocks, projections, exits: drawn, not only constants compared


def test_the_peer_can_start_from_the_weights_eejaxs_run_started_from(tiny_tree, tmp_path):
  # --peer-eejax-weights: a run at learning rate 0 ends with the parameters it started from, and the bench derives
  # the same ones from the run's folder alone; another seed gives others.
  pytest.importorskip("torch", reason="the PyTorch peer needs torch (pip install -e '.[bench]')")
  sys.path.insert(0, os.path.join(REPO, "bench"))
  import accuracy_parity  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from eejax import run  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "w")
  r = run_main(smoke_args(tiny_tree, workdir, "", "--config.train.learning_rate=0.0", "--config.seed=3",
                          "--config.eval.real_inference=False"))
  assert r.returncode == 0, r.stderr[-2000:]
  config = run.load_config(workdir)
  start = accuracy_parity.eejax_initial_variables(workdir, config)
  saved = jax.device_get(run.load_run(workdir).variables["params"])
  assert jax.tree.structure(start["params"]) == jax.tree.structure(saved)
  for a, b in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(a, b)
  config.seed = 4
  other = accuracy_parity.eejax_initial_variables(workdir, config)
  kernels = [(a, b) for a, b in zip(jax.tree.leaves(other["params"]), jax.tree.leaves(saved)) if a.ndim > 1]
  assert kernels and not any(np.array_equal(a, b) for a, b in kernels)
  config.init_from = str(tmp_path / "another")  # a run that started from another run's weights has no seed's draw
  from eejax.errors import UserError  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="started from another run's weights"):
    accuracy_parity.eejax_initial_variables(workdir, config)


@pytest.mark.parametrize("schedule,epochs,warmup,steps_per_epoch", [
    ("cosine", 4, 1.0, 10), ("cosine", 4, 0.0, 10), ("cosine", 1, 0.5, 1), ("cosine", 3, 0.25, 3),
    ("step", 6, 1.0, 5), ("step", 6, 0.0, 5)])
def test_the_peers_learning_rate_is_eejaxs_at_every_step(schedule, epochs, warmup, steps_per_epoch):
  # bench/accuracy_parity.py writes the schedule again for PyTorch and refuses to compare where the two differ;
  # warm-ups shorter than a step included (none, in both).
  pytest.importorskip("torch", reason="the PyTorch peer needs torch (pip install -e '.[bench]')")
  sys.path.insert(0, os.path.join(REPO, "bench"))
  import accuracy_parity  # pylint: disable=g-import-not-at-top
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  from eejax import state  # pylint: disable=g-import-not-at-top
  train_cfg = cifar10.get_config("cpu").train
  train_cfg.update(schedule=schedule, epochs=epochs, warmup_epochs=warmup, learning_rate=0.4, step_epochs=(2, 4))
  accuracy_parity.check_schedule(train_cfg, steps_per_epoch)  # raises where they differ
  theirs = [accuracy_parity.learning_rate(s, train_cfg, steps_per_epoch) for s in range(epochs * steps_per_epoch)]
  ours = np.asarray(state.make_schedule(train_cfg, steps_per_epoch)(np.arange(epochs * steps_per_epoch)))
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
  assert max(theirs) == pytest.approx(0.4, rel=1e-6) and min(theirs) >= 0


def test_the_compile_cache_benchmark_runs_three_jobs_and_prints_the_ratio(tiny_tree):
  r = bench("compile_cache.py", "--data", f"folder:{tiny_tree}", "--config", "configs/cifar10.py:smoke", "--",
            "--config.data.val_size=8", "--config.data.max_images=0")
  assert r.returncode == 0, r.stderr[-2000:]
  programs = int(re.search(r"fills it with (\d+) programs", r.stdout).group(1))
  cold, warm, off = (float(re.search(rf"{what}[^:]*:\s+([\d.]+) s", r.stdout).group(1))
                     for what in ("cache empty", "cache filled", "cache off"))
  assert programs >= 1 and min(cold, warm, off) > 0
  ratio = float(re.search(r"filled / off: ([\d.]+)x", r.stdout).group(1))
  assert abs(ratio - warm / off) <= 0.005 + 0.05 * (1 / warm + 1 / off) * warm / off  # the times print rounded
  r = bench("compile_cache.py", "--data", "folder:/nonexistent/tree", "--config", "configs/cifar10.py:smoke")
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
      "bench/compile_cache.py: the job failed with status 2: eejax: error:")
