"""The multi-exit network: stem, blocks, and one head after each exit point.

`MultiExitNet.__call__` returns `(logits_ExBxC, aux)` for all exits at once,
`aux["features"]` holding the feature map at every exit point. `stem` and
`segment` run the network one exit at a time (real early exit, MACs checks).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from eejax.errors import unknown_name
from eejax.models.heads import HEADS, final_head
from eejax.models.resnet import block_plan, exit_points, get_arch

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # model.dtype: the compute dtype


def scale_gradient(x, scale: float):
  """x in the forward pass; its gradient times `scale` in the backward pass (exactly x forward, any scale)."""
  if scale == 1.0:
    return x
  if scale == 0.0:  # no backward pass into x at all
    return jax.lax.stop_gradient(x)
  frozen = jax.lax.stop_gradient(x)
  return frozen + scale * (x - frozen)


class MultiExitNet(nn.Module):
  """A CIFAR-style ResNet (or MobileNet, VGG, Wide ResNet) with classifier heads part-way through.

  Attributes:
    arch: a name in `eejax.models.resnet.ARCHS`.
    num_classes: C.
    width: channel multiplier applied to every stage.
    exit_after: 1-based block numbers after which an exit sits (None: after
      each stage). The last block always carries the final classifier.
    head: a name in `HEADS`, for every exit but the last, which is the backbone's own (`linear`; VGG's `mlp`,
      the Wide ResNet's `preact`).
    head_width: channels of heads that have a hidden layer.
    head_dropout: dropout rate before every head's dense layer (training only).
    exit_grad_scale: how much of its gradient each early exit sends back into
      the backbone (1: joint training; 0: the heads learn on the features but
      never change them). The forward pass is the same whatever the value.
    ensemble_teachers: if True, a parameter `ensemble_logits` (E x E, one row
      a_j per teacher, initialised to `ensemble_init` on the diagonal and 0
      elsewhere) for multi-exit self-distillation (MATE); returned in aux.
    dtype: compute dtype (parameters stay float32).
  """
  arch: str
  num_classes: int
  width: float = 1.0
  exit_after: Sequence[int] | None = None
  head: str = "linear"
  head_width: int = 128
  head_dropout: float = 0.0
  exit_grad_scale: float = 1.0
  ensemble_teachers: bool = False
  ensemble_init: float = 2.0
  dtype: Any = jnp.float32

  def setup(self):
    arch = get_arch(self.arch)
    if self.head not in HEADS:
      raise unknown_name("head", self.head, HEADS)
    self.points = exit_points(arch, self.exit_after)
    stem_width = max(1, round(arch.stem_width * self.width))
    self.stem_conv = nn.Conv(stem_width, (3, 3), use_bias=False, dtype=self.dtype)
    self.stem_norm = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype) if arch.stem_norm else None
    dropout = {"dropout": arch.block_dropout} if arch.block_dropout else {}
    self.blocks = [arch.block(f, s, dtype=self.dtype, **dropout) for f, s in block_plan(arch, self.width)]
    final_cls, final_width, final_dropout = final_head(arch, self.width, self.head_dropout)
    self.heads = [HEADS[self.head](self.num_classes, width=self.head_width, dropout=self.head_dropout,
                                   dtype=self.dtype) for _ in self.points[:-1]] + [
                      final_cls(self.num_classes, width=final_width, dropout=final_dropout, dtype=self.dtype)]
    if self.ensemble_teachers:
      num = len(self.points)
      self.ensemble_logits = self.param("ensemble_logits",
                                        lambda key: self.ensemble_init * jnp.eye(num, dtype=jnp.float32))

  @property
  def num_exits(self) -> int:
    return len(exit_points(get_arch(self.arch), self.exit_after))

  def stem(self, x_BxHxWx3, train: bool = False):
    h = self.stem_conv(x_BxHxWx3.astype(self.dtype))
    return h if self.stem_norm is None else nn.relu(self.stem_norm(h, use_running_average=not train))

  def segment(self, k: int, h, train: bool = False):
    """Blocks between exit k-1 and exit k (0-based k), then head k: (h, logits_BxC)."""
    start = 0 if k == 0 else self.points[k - 1]
    for block in self.blocks[start:self.points[k]]:
      h = block(h, train)
    to_head = h if k == len(self.points) - 1 else scale_gradient(h, self.exit_grad_scale)
    return h, self.heads[k](to_head, train)

  def pooled_features(self, x_BxHxWx3):
    """(pooled_BxC after every block, float32; the final exit's logits_BxC), in inference mode.

    What BTS-EE's branches see: its 1D-conv heads start with a global average
    pool, so a branch can be trained on these instead of the feature maps.
    """
    h = self.stem(x_BxHxWx3, False)
    pooled = []
    for block in self.blocks:
      h = block(h, False)
      pooled.append(jnp.mean(h, axis=(1, 2)).astype(jnp.float32))
    return tuple(pooled), self.heads[-1](h, False)

  def __call__(self, x_BxHxWx3, train: bool = False):
    h = self.stem(x_BxHxWx3, train)
    logits, features = [], []
    for k in range(len(self.points)):
      h, logits_BxC = self.segment(k, h, train)
      logits.append(logits_BxC)
      features.append(h)
    aux = {"features": tuple(features)}
    if self.ensemble_teachers:
      aux["ensemble_logits_JxE"] = self.ensemble_logits
    return jnp.stack(logits), aux
