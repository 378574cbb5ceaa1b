"""MobileNet's depthwise 3x3 convolution, forward and backward: XLA's grouped convolution against PyTorch's.

  python bench/depthwise.py [--batch 128] [--size 16] [--channels 64]

Times, on the same device and the same tensors: (a) the layer as eejax's
MobileNet computes it (`lax.conv_general_dilated` with feature_group_count =
channels), (b) the same function written as nine shifted per-channel products
(what XLA would run instead; not used, since exports must keep one depthwise
convolution for the devices that accelerate it), and (c) PyTorch's depthwise
`conv2d` (groups = channels), the peer. Checks that (a) and (b) agree before
timing, and prints each time and its ratio to the peer.
"""
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from timing import seconds_per_call
from eejax import cli

try:
  import torch  # pylint: disable=g-import-not-at-top
except ImportError:
  torch = None


def grouped(x_BxHxWxC, k_3x3x1xC):
  return jax.lax.conv_general_dilated(x_BxHxWxC, k_3x3x1xC, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x_BxHxWxC.shape[-1])


def shifted(x_BxHxWxC, k_3x3x1xC):
  _, h, w, _ = x_BxHxWxC.shape
  padded = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(padded[:, i:i + h, j:j + w, :] * k_3x3x1xC[i, j, 0] for i in range(3) for j in range(3))


def torch_seconds(x_BxHxWxC, k_3x3x1xC, repeats):
  device = "cuda" if torch.cuda.is_available() else "cpu"
  x = torch.tensor(np.asarray(x_BxHxWxC).transpose(0, 3, 1, 2), device=device, requires_grad=True)
  k = torch.tensor(np.asarray(k_3x3x1xC).transpose(3, 2, 0, 1).copy(), device=device, requires_grad=True)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def call():
    loss = (torch.nn.functional.conv2d(x, k, padding=1, groups=x.shape[1]) ** 2).sum()
    return torch.autograd.grad(loss, (x, k))

  call()
  sync()
  start = time.perf_counter()
  for _ in range(repeats):
    call()
  sync()
  return (time.perf_counter() - start) / repeats, torch.__version__


def main():
  parser = cli.ArgumentParser("bench/depthwise.py", description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=cli.positive(int), default=128)
  parser.add_argument("--size", type=cli.positive(int), default=16, help="height and width of the feature map")
  parser.add_argument("--channels", type=cli.positive(int), default=64)
  parser.add_argument("--repeats", type=cli.positive(int), default=20)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, args.channels))
  k = jax.random.normal(jax.random.key(1), (3, 3, 1, args.channels))
  np.testing.assert_allclose(grouped(x, k), shifted(x, k), rtol=1e-4, atol=1e-4)
  peer = (None, None) if torch is None else torch_seconds(x, k, args.repeats)
  print(f"hardware: {jax.devices()[0].device_kind} ({jax.default_backend()}), host {platform.machine()}; "
        f"jax {jax.__version__}, " + ("torch not installed: the peer is skipped (pip install 'eejax[bench]')"
                                      if torch is None else f"torch {peer[1]}") + f"; {time.strftime('%Y-%m-%d')}")
  print(f"depthwise 3x3, forward and backward, {args.batch} x {args.size}x{args.size}x{args.channels} "
        "(the two eejax forms agree to 1e-4):")
  for name, fn in (("eejax, grouped convolution (used)", grouped), ("same function as 9 shifted products", shifted)):
    grad = jax.jit(jax.grad(lambda x, k, fn=fn: jnp.sum(fn(x, k) ** 2), argnums=(0, 1)))
    seconds = seconds_per_call(grad, x, k, repeats=args.repeats)
    versus = "" if peer[0] is None else f"  -> {peer[0] / seconds:.2f}x PyTorch's speed"
    print(f"  {name:36s}: {1e3 * seconds:8.2f} ms{versus}")
  if peer[0] is not None:
    print(f"  {'PyTorch conv2d, groups=channels':36s}: {1e3 * peer[0]:8.2f} ms")


if __name__ == "__main__":
  cli.guarded(main, "bench/depthwise.py")
