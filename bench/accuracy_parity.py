"""Test accuracy of one recipe trained by eejax and by PyTorch: is a shortfall eejax's, or the recipe's?

  python bench/accuracy_parity.py --workdir W -- --config configs/cifar10.py:cpu [--config.x=y ...]
  python bench/accuracy_parity.py --workdir W          # W already holds a finished eejax run

eejax trains the config in W with `python -m eejax.main` (or, when W holds a
finished run, its report is read). The peer (`bench/torch_peer.py`) then trains
the same architecture from W's config.json on the same images (the same
subset, validation carve and channel statistics, decoded by eejax), with the
same recipe written again in PyTorch: random crop of the zero-padded image and
horizontal flip per image, a fresh permutation every epoch dropping the last
partial batch, the weighted sum of every exit's label-smoothed cross-entropy,
SGD with Nesterov momentum and coupled weight decay on kernels only, and a
per-step linear warm-up from 0 then cosine to 0 (or the step schedule). What
differs by design: PyTorch's own initialisation (eejax: flax's lecun-normal
kernels, which `--peer-flax-init` gives the peer too, and a zero-initialised
last BatchNorm scale in each block, which `--peer-zero-init` does; or
`--peer-eejax-weights`: the very weights eejax's run started from), its own
random order and augmentation, and BatchNorm's running variance (unbiased in
PyTorch). From the same weights and batch, a training step of each gives the
same weights (tests/test_bench.py). So the two runs should differ by seed
noise only; `--peer-seeds 0,1,2` shows how large that is at the chosen scale.

Prints each exit's test accuracy for both, the difference, the training
throughput of each, and the hardware.
"""
import json
import math
import os
import platform
import sys
import time

import ml_collections
import numpy as np
try:
  import torch
  import torch.nn.functional as F
  import torch_peer
except ImportError:
  raise SystemExit("bench/accuracy_parity.py: error: the peer needs PyTorch: pip install -e '.[bench]'") from None
import jax
import optax
from eejax import cli, data, run, signals, state, train
from eejax.errors import UserError
from eejax.models.resnet import ARCHS


def learning_rate(step: int, train_cfg, steps_per_epoch: int) -> float:
  """The peak-scaled learning rate of 0-based step `step`: linear warm-up from 0, then cosine to 0 (or steps)."""
  peak, total = train_cfg.learning_rate, train_cfg.epochs * steps_per_epoch
  warmup = int(train_cfg.warmup_epochs * steps_per_epoch)  # under one step: none
  if step < warmup:
    return peak * step / warmup
  if train_cfg.schedule == "cosine":
    span = max(total, warmup + 1) - warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))
  passed = sum(step >= int(e * steps_per_epoch) for e in train_cfg.step_epochs)
  return peak * train_cfg.step_factor**passed


def check_schedule(train_cfg, steps_per_epoch: int) -> None:
  """The peer's schedule against eejax's optax one at every step: the recipe must be the same."""
  ours = state.make_schedule(train_cfg, steps_per_epoch)
  steps = np.arange(train_cfg.epochs * steps_per_epoch)
  theirs = np.array([learning_rate(int(s), train_cfg, steps_per_epoch) for s in steps])
  worst = float(np.max(np.abs(np.asarray(ours(steps)) - theirs)))
  if worst > 1e-6 * train_cfg.learning_rate:
    raise UserError(f"the peer's learning-rate schedule differs from eejax's by up to {worst:.3g}; not comparing")


def augment(x_BxHxWx3, pad: int, flip: bool, generator):
  """uint8 images on the device: per-image random crop of the zero-padded image, then a random h-flip (the
  random numbers drawn on the device too, from `generator`)."""
  b, h, w, _ = x_BxHxWx3.shape
  dev = x_BxHxWx3.device
  if pad:
    padded = F.pad(x_BxHxWx3, (0, 0, pad, pad, pad, pad))
    dy_B, dx_B = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=dev)
    rows_BxH = dy_B[:, None] + torch.arange(h, device=dev)
    cols_BxW = dx_B[:, None] + torch.arange(w, device=dev)
    x_BxHxWx3 = padded[torch.arange(b, device=dev)[:, None, None], rows_BxH[:, :, None], cols_BxW[:, None, :]]
  if flip:
    flip_B = torch.rand(b, generator=generator, device=dev) < 0.5
    x_BxHxWx3 = torch.where(flip_B[:, None, None, None], x_BxHxWx3.flip(2), x_BxHxWx3)
  return x_BxHxWx3


def memory_format(device: str):
  """channels_last on a GPU, where it is the fast layout; PyTorch's default on the CPU, where torch 2.13's
  channels_last backward corrupted the heap (`free(): invalid next size`) on the 4-channel ResNet-8 x0.25."""
  return torch.channels_last if device == "cuda" else torch.contiguous_format


def to_input(x_BxHxWx3, mean_C, std_C):
  """uint8 NHWC to normalised float NCHW, in the device's layout (`memory_format`)."""
  x = (x_BxHxWx3.float() / 255.0 - mean_C) / std_C
  return x.permute(0, 3, 1, 2).contiguous(memory_format=memory_format(x.device.type))


def peer_model(config, num_classes: int, zero_init_residual: bool = False, flax_init: bool = False):
  """The PyTorch model of the config, or a UserError naming what the peer does not have."""
  m = config.model
  arch = ARCHS[m.name]
  last = sum(arch.stage_sizes)
  after = None if m.exit_after is None else tuple(m.exit_after)
  if after not in (None, (last,)):
    raise UserError(f"the peer has exits after every stage or only the last; not model.exit_after={list(after)}")
  if m.head != "linear" and after is None:
    raise UserError(f"the peer has linear heads only; not model.head={m.head!r}")
  if config.scheme != "joint":
    raise UserError(f"the peer trains the joint scheme only; not scheme={config.scheme!r}")
  return torch_peer.build(m.name, m.width, single_exit=after is not None, num_classes=num_classes,
                          head_dropout=m.head_dropout, exit_grad_scale=m.exit_grad_scale,
                          zero_init_residual=zero_init_residual, flax_init=flax_init)


def peer_optimizer(model, train_cfg):
  """SGD with (Nesterov) momentum and coupled weight decay on kernels only (ndim > 1), or on every parameter with
  train.weight_decay_on=all (PyTorch's default, SDN's code); the rate is set per step."""
  everything = train_cfg.weight_decay_on == "all"
  decay = [p for p in model.parameters() if everything or p.ndim > 1]
  rest = [p for p in model.parameters() if not everything and p.ndim <= 1]
  return torch.optim.SGD([{"params": decay, "weight_decay": train_cfg.weight_decay},
                          {"params": rest, "weight_decay": 0.0}],
                         lr=0.0, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov)


def peer_step(model, opt, x, labels_B, weights_E, train_cfg, learning_rate_now: float, bf16: bool):
  """One training step of the joint objective on the normalised batch x; returns each exit's cross-entropy."""
  for group in opt.param_groups:
    group["lr"] = learning_rate_now
  with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
    logits_ExBxC = model(x)
  ce_E = torch.stack([F.cross_entropy(l.float(), labels_B, label_smoothing=train_cfg.label_smoothing)
                      for l in logits_ExBxC])
  loss = torch.dot(weights_E, ce_E)
  opt.zero_grad(set_to_none=True)
  loss.backward()
  if train_cfg.grad_clip > 0:
    torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
  opt.step()
  return ce_E.detach()


def eejax_initial_variables(workdir: str, config):
  """The parameters and BatchNorm statistics that eejax's run in `workdir` started from (its seed's step 0)."""
  if config.get("init_from"):
    raise UserError(f"--peer-eejax-weights: the run in {workdir} started from another run's weights "
                    f"(init_from={config.init_from!r}), not from its seed; compare a run trained from scratch")
  spec = run.load_spec(workdir, config)
  model = spec.build()
  init = jax.jit(lambda key: state.init_state(model, optax.identity(), key, spec.image_shape,
                                              init=config.train.get("init", "flax")))
  s = jax.device_get(init(train.run_keys(config.seed).init))
  return {"params": s.params, "batch_stats": s.batch_stats}


def train_peer(config, ds, mean_C, std_C, seed: int, device: str, zero_init_residual: bool = False,
               log_every_s: float = 30.0, flax_init: bool = False, start=None):
  """(test accuracy per exit, training images/s) of the peer trained with `config`'s recipe on `ds`; `start`:
  eejax variables to start from instead of a draw of the peer's own."""
  torch.manual_seed(seed)
  torch.backends.cudnn.benchmark = True  # the fastest convolution algorithms for these fixed shapes (CUDA only)
  generator = torch.Generator(device).manual_seed(seed)  # on the device: no host copy, no sync, per step
  t = config.train
  model = peer_model(config, ds.num_classes, zero_init_residual, flax_init)
  if start is not None:
    torch_peer.load_flax(model, start)
  model = model.to(device).to(memory_format=memory_format(device))
  opt = peer_optimizer(model, t)
  num_exits = 1 if model.heads[0] is None else len(model.heads)
  weights_E = torch.tensor(t.exit_weights or (1.0,) * num_exits, device=device)
  bf16 = config.model.dtype == "bfloat16"
  images = torch.from_numpy(ds.train.images_NxHxWx3).to(device)
  labels = torch.from_numpy(ds.train.labels_N.astype(np.int64)).to(device)
  mean, std = (torch.tensor(np.asarray(v, np.float32), device=device) for v in (mean_C, std_C))
  steps_per_epoch = len(labels) // t.batch_size
  total = t.epochs * steps_per_epoch
  model.train()
  start_s = last_print = time.perf_counter()
  for step in range(total):
    if step % steps_per_epoch == 0:
      order = torch.randperm(len(labels), generator=generator, device=device)
    idx = order[(step % steps_per_epoch) * t.batch_size:(step % steps_per_epoch + 1) * t.batch_size]
    x = to_input(augment(images[idx], config.data.crop_pad, config.data.flip, generator), mean, std)
    ce_E = peer_step(model, opt, x, labels[idx], weights_E, t, learning_rate(step, t, steps_per_epoch), bf16)
    if time.perf_counter() - last_print > log_every_s:
      last_print = time.perf_counter()
      print(f"  peer seed {seed}: step {step + 1}/{total} loss {float(weights_E @ ce_E):.4f}", file=sys.stderr,
            flush=True)
  if device == "cuda":
    torch.cuda.synchronize()
  images_per_s = total * t.batch_size / (time.perf_counter() - start_s)
  return evaluate_peer(model, ds.test, mean, std, device, bf16, config.eval.batch_size), images_per_s


@torch.no_grad()
def evaluate_peer(model, split, mean, std, device, bf16, batch_size):
  """Test accuracy of every exit, BatchNorm in inference mode."""
  model.eval()
  correct = 0
  for i in range(0, len(split), batch_size):
    x = to_input(torch.from_numpy(split.images_NxHxWx3[i:i + batch_size]).to(device), mean, std)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      pred_ExB = model(x).argmax(-1).cpu()
    correct = correct + (pred_ExB == torch.from_numpy(split.labels_N[i:i + batch_size].astype(np.int64))).sum(1)
  return (correct.double() / len(split)).tolist()


def eejax_report(workdir: str, eejax_args: list[str]) -> tuple[dict, str]:
  """(report.json, where it came from): trains `eejax_args` in `workdir`, unless it holds a finished run."""
  path = os.path.join(workdir, "report.json")
  if os.path.exists(path) and not eejax_args:
    return json.load(open(path, encoding="utf-8")), f"read from {path} (trained before)"
  if not eejax_args:
    raise UserError(f"{workdir} holds no finished run: give the run's flags after --, e.g. "
                     "-- --config configs/cifar10.py:cpu")
  command = [sys.executable, "-m", "eejax.main", *eejax_args, f"--workdir={workdir}"]
  print("$ " + " ".join(command[1:]), flush=True)
  status, signum = signals.wait_for_job(command)  # Ctrl-C: the run saves its checkpoint, and this waits for it
  if signum:
    cli.interrupted("bench/accuracy_parity.py", signum)
  if status != 0:
    raise UserError(f"eejax's run stopped with exit status {status} (its own message is above); fix it and run "
                    "this command again: a stopped run resumes")
  return json.load(open(path, encoding="utf-8")), "trained by this command"


def main():
  parser = cli.ArgumentParser("bench/accuracy_parity.py", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="eejax's run: trained here unless it holds a finished one")
  parser.add_argument("--peer-seeds", default="0", help="comma-separated seeds of the PyTorch runs")
  parser.add_argument("--peer-zero-init", action="store_true",
                      help="start each block's last BatchNorm scale at 0 in the peer too, as eejax does")
  parser.add_argument("--peer-flax-init", action="store_true",
                      help="draw the peer's kernels as flax does (truncated normal, variance 1/fan_in; biases 0)")
  parser.add_argument("--peer-eejax-weights", action="store_true",
                      help="start the peer from the very weights eejax's run started from (its seed's step 0): then "
                           "only the order of the images and the augmentation's draws differ")
  parser.add_argument("--json", help="write both runs' figures to this file")
  args, rest = parser.parse_known_args()
  args.workdir = os.path.abspath(args.workdir)
  if args.peer_eejax_weights and (args.peer_zero_init or args.peer_flax_init):
    raise UserError("--peer-eejax-weights starts the peer from eejax's own weights: --peer-zero-init and "
                    "--peer-flax-init draw new ones; give one or the other")
  eejax_args = [a for a in rest if a != "--"]
  report, source = eejax_report(args.workdir, eejax_args)
  config = ml_collections.ConfigDict(json.load(open(os.path.join(args.workdir, "config.json"), encoding="utf-8")))
  spec = json.load(open(os.path.join(args.workdir, "run.json"), encoding="utf-8"))
  try:
    ds = data.from_config(config.data)
  except UserError as e:  # a relative data path is read from where the run was started
    raise UserError(f"the run's data: {e}") from None
  check_schedule(config.train, len(ds.train) // config.train.batch_size)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  kind = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
  print(f"hardware: {kind} ({os.cpu_count()} host cores); torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
  m, t = config.model, config.train
  print(f"recipe: {m.name} x{m.width:g}, {len(report['exits'])} exit(s), {m.dtype}, {t.epochs} epochs of "
        f"{t.batch_size} on {len(ds.train):,} images, lr {t.learning_rate:g} {t.schedule} (warm-up "
        f"{t.warmup_epochs:g} epochs), weight decay {t.weight_decay:g}, label smoothing {t.label_smoothing:g}; "
        f"test split {len(ds.test):,} images")
  ours_E = [e["accuracy"] for e in report["exits"]]
  start = eejax_initial_variables(args.workdir, config) if args.peer_eejax_weights else None
  runs = []
  for seed in [int(s) for s in args.peer_seeds.split(",")]:
    accuracy_E, rate = train_peer(config, ds, spec["mean_C"], spec["std_C"], seed, device, args.peer_zero_init,
                                  flax_init=args.peer_flax_init, start=start)
    runs.append({"seed": seed, "test_accuracy": accuracy_E, "train_images_per_s": rate})
  peer_E = np.mean([r["test_accuracy"] for r in runs], axis=0)
  spread_E = np.ptp([r["test_accuracy"] for r in runs], axis=0)
  print(f"eejax: seed {config.seed}, {config.train.get('init', 'flax')}'s kernel initialisation, {source}; "
        f"{report.get('train_images_per_s', float('nan')):,.0f} training img/s")
  if start is not None:
    begins = "eejax's initial weights (its seed's step 0)"
  else:
    begins = (f"{'zero' if args.peer_zero_init else 'default'} initial last BatchNorm scale in each block, "
              f"{'flax' if args.peer_flax_init else 'PyTorch'}'s kernel initialisation")
  print(f"PyTorch: seed(s) {args.peer_seeds}, {begins}; "
        + ", ".join(f"{r['train_images_per_s']:,.0f}" for r in runs) + " training img/s")
  print("exit | eejax test % | PyTorch test % (mean; range over seeds) | eejax - PyTorch")
  for e, (ours, peer, spread) in enumerate(zip(ours_E, peer_E, spread_E)):
    print(f"{e + 1:4d} | {100 * ours:12.2f} | {100 * peer:6.2f} ({100 * spread:.2f}) | {100 * (ours - peer):+.2f}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"workdir": args.workdir, "eejax": ours_E, "peer_runs": runs, "device": kind,
                 "peer_start": "eejax" if start is not None else
                 ("flax" if args.peer_flax_init else "pytorch") + ("+zero" if args.peer_zero_init else "")}, f, indent=1)


if __name__ == "__main__":
  cli.guarded(main, "bench/accuracy_parity.py")  # a mistake is one line, never a traceback
