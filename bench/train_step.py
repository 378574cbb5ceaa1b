"""Training-step throughput: eejax's jitted multi-exit step, its plain single-exit step, and PyTorch.

  python bench/train_step.py                       # CPU defaults: small widths and batches
  python bench/train_step.py --width 1 --batch 512 --steps 20   # a GPU

For each model and dtype it prints images/s (steady state; compilation timed
apart), the ratio multi-exit / plain, the ratio eejax / PyTorch (the peer in
bench/torch_peer.py: channels_last, autocast for bfloat16, torch.compile on
CUDA), and MACs-based utilisation: images/s x 3 x forward MACs (forward +
backward ~ 3 forwards) against the peak stated on the line. Before timing, both
frameworks compute the joint loss of the same initial weights on the same batch
and must agree.
"""
import dataclasses
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:  # the peer; without PyTorch eejax is still measured, and the line says the peer was skipped
  import torch
  import torch.nn.functional as F
  import torch_peer
except ImportError:
  torch = None
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/, from any folder
from configs import cifar10  # pylint: disable=wrong-import-position
from eejax import cli, flops, sharding, train
from eejax.models.resnet import ARCHS, get_arch
from eejax.run import build_model
from eejax.state import init_state, make_optimizer, make_schedule

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (FLOP/s; MACs are half).
GPU_PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12}


def measured_peak_macs_per_s(dtype):
  """MACs/s of one large XLA matrix product in `dtype` on this device, random operands, median of 10."""
  on_cpu = jax.default_backend() == "cpu"
  n = 2048 if on_cpu else 8192
  dt = jnp.float32 if on_cpu or dtype == "float32" else jnp.bfloat16
  a, b = (jax.random.normal(k, (n, n), dt) for k in jax.random.split(jax.random.key(0)))
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(10):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return n**3 / float(np.median(times)), f"measured: XLA {jnp.dtype(dt).name} {n}x{n} matmul on this device"


def datasheet_peak_macs_per_s(dtype):
  """The datasheet's dense tensor-core peak in MACs/s (float32 counted at half the bf16 rate), or None."""
  kind = jax.devices()[0].device_kind
  for name, flops_per_s in GPU_PEAK_FLOPS.items():
    if name in kind:
      return flops_per_s / 2 / (2 if dtype == "float32" else 1)
  return None


def eejax_step(arch, width, batch, dtype, single_exit, steps, per_call):
  config = cifar10.get_config("cpu")
  config.model.name, config.model.width, config.model.dtype = arch, width, dtype
  if single_exit:
    config.model.exit_after = (sum(ARCHS[arch].stage_sizes),)
  model = build_model(config.model, 10)
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  tx = make_optimizer(config.train, make_schedule(config.train, 100))
  state = jax.device_put(init_state(model, tx, jax.random.key(0), (32, 32, 3)), rep)
  n = 8 * batch
  rng = np.random.default_rng(0)
  data = jax.device_put({"images": rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).astype(np.int32),
                         "mean": np.full(3, 0.5, np.float32), "std": np.full(3, 0.25, np.float32)}, rep)
  keys = jax.device_put((jax.random.key(1), jax.random.key(2)), rep)
  step_fn = functools.partial(train.train_step, model=model, tx=tx, loss_fn=train.make_loss_fn(config, model.num_exits),
                              batch_size=batch, crop_pad=4, flip=True, batch_sharding=sharding.batch_sharded(mesh))
  chunk = train.make_train_chunk(step_fn, per_call, rep)
  start = time.perf_counter()
  state, metrics = chunk(state, data, keys, {})
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  calls = max(1, steps // per_call)
  start = time.perf_counter()
  for _ in range(calls):
    state, metrics = chunk(state, data, keys, {})
  jax.block_until_ready(metrics)
  return batch * per_call * calls / (time.perf_counter() - start), compile_s, model


def torch_step(arch, width, batch, dtype, steps, compile_mode):
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = torch_peer.build(arch, width).to(device).to(memory_format=torch.channels_last)
  decay = [p for p in model.parameters() if p.ndim > 1]
  rest = [p for p in model.parameters() if p.ndim <= 1]
  opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
                        lr=0.1, momentum=0.9, nesterov=True)
  x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch,), device=device)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = model(x)
      loss = sum(F.cross_entropy(l.float(), y) for l in logits)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  if compile_mode:
    step = torch.compile(step)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  start = time.perf_counter()
  step()
  step()
  sync()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  return batch * steps / (time.perf_counter() - start), compile_s


def same_function(arch, width, batch=8):
  """Joint training-mode loss of the same weights and batch in both frameworks: (eejax, torch). A backbone's own
  dropout (VGG's classifier, the Wide ResNet's blocks) is off in both for the check: their masks cannot match."""
  spec = ARCHS[arch]
  ARCHS[arch] = dataclasses.replace(spec, final_dropout=0.0 if spec.final_dropout is not None else None,
                                    block_dropout=0.0)
  try:
    return _same_function(arch, width, batch)
  finally:
    ARCHS[arch] = spec


def _same_function(arch, width, batch):
  model = build_model(cifar10.get_config("cpu").model.copy_and_resolve_references(), 10)
  model = model.clone(arch=arch, width=width)
  x = np.random.default_rng(1).normal(size=(batch, 32, 32, 3)).astype(np.float32)
  y = np.random.default_rng(2).integers(0, 10, batch)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = {"params": jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
                                      variables["params"]), "batch_stats": variables["batch_stats"]}
  (logits, _), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  ours = float(sum(jnp.mean(-jax.nn.log_softmax(l)[jnp.arange(batch), y]) for l in logits))
  peer = torch_peer.build(arch, width)
  torch_peer.load_flax(peer, jax.device_get(variables))
  peer.train()
  with torch.no_grad():
    out = peer(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    theirs = float(sum(F.cross_entropy(l, torch.from_numpy(y)) for l in out))
  return ours, theirs


def main():
  parser = cli.ArgumentParser("bench/train_step.py", description=__doc__.splitlines()[0])
  on_cpu = jax.default_backend() == "cpu"
  parser.add_argument("--models", default="resnet18,resnet56")
  parser.add_argument("--width", type=cli.positive(float), default=0.25 if on_cpu else 1.0, help="width multiplier of the wide models (ResNet-18/34/50, MobileNet, VGG-16, WRN-32-4)")
  parser.add_argument("--batch", type=cli.positive(int), default=32 if on_cpu else 512)
  parser.add_argument("--steps", type=cli.positive(int), default=12 if on_cpu else 20)
  parser.add_argument("--steps-per-call", type=cli.positive(int), default=1 if on_cpu else 10,
                      help="steps per jitted call (lax.scan); unrolled on CPU, so keep it small there")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto")
  parser.add_argument("--sweep-batches", default="", help="also eejax alone, bfloat16 multi-exit, at these batches")
  parser.add_argument("--json", help="write every measured figure to this file")
  args = parser.parse_args()
  rows = []
  compile_mode = torch is not None and (args.torch_compile == "on" or (args.torch_compile == "auto"
                                                                       and torch.cuda.is_available()))
  peer_line = ("torch not installed: the PyTorch peer is skipped (pip install 'eejax[bench]')" if torch is None else
               f"torch {torch.__version__} (compile {'on' if compile_mode else 'off'})")
  if torch is not None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
  print(f"hardware: {jax.devices()[0].device_kind} ({jax.default_backend()} x{jax.device_count()}), host "
        f"{platform.machine()}; jax {jax.__version__}, {peer_line}; {time.strftime('%Y-%m-%d')}")
  for arch in args.models.split(","):
    width = args.width if get_arch(arch).stage_widths[0] > 16 else 1.0  # the thin ResNets (16 channels) stay whole
    if torch is not None:
      ours, theirs = same_function(arch, width)
      print(f"{arch} x{width}: same function check, joint loss eejax {ours:.6f} torch {theirs:.6f} "
            f"(rel. diff {abs(ours - theirs) / abs(theirs):.1e})")
      if abs(ours - theirs) > 1e-3 * abs(theirs):
        raise SystemExit("the two implementations differ; not timing them")
    for dtype in args.dtypes.split(","):
      multi, multi_compile, model = eejax_step(arch, width, args.batch, dtype, False, args.steps, args.steps_per_call)
      plain, _, _ = eejax_step(arch, width, args.batch, dtype, True, args.steps, args.steps_per_call)
      peer, peer_compile = (torch_step(arch, width, args.batch, dtype, args.steps, compile_mode)
                            if torch is not None else (None, None))
      peak, source = measured_peak_macs_per_s(dtype)
      sheet = datasheet_peak_macs_per_s(dtype)
      fwd = flops.exit_macs(model, (32, 32, 3)).cumulative[-1]
      versus = ("torch skipped" if peer is None else
                f"torch {peer:9.1f} img/s (first steps {peer_compile:.1f} s) -> eejax/torch {multi / peer:.2f}x")
      print(f"  {dtype:8s} batch {args.batch}: eejax multi-exit {multi:9.1f} img/s (compile {multi_compile:.1f} s), "
            f"plain {plain:9.1f} img/s -> multi/plain cost {plain / multi:.3f}x; {versus}; utilisation "
            f"{100 * multi * 3 * fwd / peak:.1f}% of {peak / 1e12:.3f} T MAC/s ({source})"
            + ("" if sheet is None else f", {100 * multi * 3 * fwd / sheet:.1f}% of the datasheet's "
               f"{sheet / 1e12:.1f} T MAC/s"))
      rows.append({"model": arch, "width": width, "dtype": dtype, "batch": args.batch, "eejax_multi": multi,
                   "eejax_plain": plain, "torch": peer, "utilisation": multi * 3 * fwd / peak,
                   "peak_macs_per_s": peak, "datasheet_macs_per_s": sheet})
    for batch in [int(b) for b in args.sweep_batches.split(",") if b]:
      multi, compile_s, _ = eejax_step(arch, width, batch, "bfloat16", False, args.steps, args.steps_per_call)
      print(f"  bfloat16 batch {batch}: eejax multi-exit {multi:9.1f} img/s (compile {compile_s:.1f} s)")
      rows.append({"model": arch, "width": width, "dtype": "bfloat16", "batch": batch, "eejax_multi": multi})
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  cli.guarded(main, "bench/train_step.py")  # a mistake is one line, never a traceback
