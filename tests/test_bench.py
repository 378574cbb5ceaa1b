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

from conftest import REPO


def bench(script, *args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "bench")]), PYTHONUNBUFFERED="1")
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
    ("depthwise.py", ["--channels", "0"], "must be 1 or more"),
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
