"""CIFAR-style ResNets as pure-functional Flax (linen) modules, and `ARCHS`, every backbone by name.

All backbones use a 3x3 stride-1 stem (no max-pool), so 32x32 inputs keep full
resolution in the first stage; the ResNets use projection shortcuts (1x1 conv
+ BN) where the shape changes, and MobileNet's, VGG's and the Wide ResNet's
blocks are in `eejax.models.mobilenet`, `eejax.models.vgg` and `eejax.models.wide`. Each block class has a static `macs(hwc, features, strides, count_padding)`
giving (MACs for one image, output hwc); see `eejax.flops`.
"""
import dataclasses
import functools
import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from eejax.errors import UserError, unknown_name
from eejax.models.layers import batch_norm, conv_macs
from eejax.models.mobilenet import DepthwiseSeparableBlock
from eejax.models.vgg import ConvBlock
from eejax.models.wide import WideBlock


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34 and the thin ResNet-20/56/110)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    h = conv(self.features, (3, 3), self.strides)(x_BxHxWxC)
    h = nn.relu(batch_norm(train, self.dtype)(h))
    h = conv(self.features, (3, 3))(h)
    h = batch_norm(train, self.dtype, scale_init=nn.initializers.zeros)(h)
    shortcut = x_BxHxWxC
    if shortcut.shape != h.shape:
      shortcut = conv(self.features, (1, 1), self.strides)(x_BxHxWxC)
      shortcut = batch_norm(train, self.dtype)(shortcut)
    return nn.relu(h + shortcut)

  @staticmethod
  def macs(hwc, features, strides, count_padding=True):
    hw, c = hwc[0], hwc[2]
    m1, hw_out = conv_macs(hw, c, features, 3, strides, count_padding=count_padding)
    m2, _ = conv_macs(hw_out, features, features, 3, 1, count_padding=count_padding)
    proj = 0
    if strides != 1 or c != features:
      proj, _ = conv_macs(hw, c, features, 1, strides, count_padding=count_padding)
    return m1 + m2 + proj, (hw_out, hw_out, features)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    h = nn.relu(batch_norm(train, self.dtype)(conv(self.features, (1, 1))(x_BxHxWxC)))
    h = nn.relu(batch_norm(train, self.dtype)(conv(self.features, (3, 3), self.strides)(h)))
    h = conv(self.features * 4, (1, 1))(h)
    h = batch_norm(train, self.dtype, scale_init=nn.initializers.zeros)(h)
    shortcut = x_BxHxWxC
    if shortcut.shape != h.shape:
      shortcut = conv(self.features * 4, (1, 1), self.strides)(x_BxHxWxC)
      shortcut = batch_norm(train, self.dtype)(shortcut)
    return nn.relu(h + shortcut)

  @staticmethod
  def macs(hwc, features, strides, count_padding=True):
    hw, c = hwc[0], hwc[2]
    m1, _ = conv_macs(hw, c, features, 1, 1, count_padding=count_padding)
    m2, hw_out = conv_macs(hw, features, features, 3, strides, count_padding=count_padding)
    m3, _ = conv_macs(hw_out, features, features * 4, 1, 1, count_padding=count_padding)
    proj = 0
    if strides != 1 or c != features * 4:
      proj, _ = conv_macs(hw, c, features * 4, 1, strides, count_padding=count_padding)
    return m1 + m2 + m3 + proj, (hw_out, hw_out, features * 4)


@dataclasses.dataclass(frozen=True)
class Arch:
  block: type
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  stem: int = 0  # the stem's channels; 0: the first stage's
  pool_last: bool = False  # the last block of every stage halves the size (VGG), not the first of the next
  stem_norm: bool = True  # BatchNorm and ReLU after the stem's convolution (not in pre-activation networks)
  block_dropout: float = 0.0  # dropout inside each block, where its block has one (WRN's)
  final_head: str = "linear"  # the final exit's head, a name in eejax.models.heads.HEADS
  final_width: int = 0  # its hidden width (before model.width), where it has one
  final_dropout: float | None = None  # its dropout; None: model.head_dropout

  @property
  def stem_width(self):
    return self.stem or self.stage_widths[0]


ARCHS = {
    # Thin CIFAR ResNets (He et al. 2016, 6n+2 layers).
    "resnet8": Arch(BasicBlock, (1, 1, 1), (16, 32, 64)),
    "resnet20": Arch(BasicBlock, (3, 3, 3), (16, 32, 64)),
    "resnet56": Arch(BasicBlock, (9, 9, 9), (16, 32, 64)),
    "resnet110": Arch(BasicBlock, (18, 18, 18), (16, 32, 64)),
    # CIFAR variants of the ImageNet ResNets.
    "resnet18": Arch(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": Arch(BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet50": Arch(BottleneckBlock, (3, 4, 6, 3), (64, 128, 256, 512)),
    # The CIFAR MobileNet (v1) of SDN: a stage ends before each stride 2 (eejax.models.mobilenet).
    "mobilenet": Arch(DepthwiseSeparableBlock, (1, 2, 2, 6, 2), (64, 128, 256, 512, 1024), stem=32),
    # The CIFAR VGG-16 (BatchNorm) of SDN: the stem is its first convolution, a stage ends in a max-pool, and two
    # dense layers of 512 with dropout 0.5 come before the classifier (eejax.models.vgg).
    "vgg16": Arch(ConvBlock, (1, 2, 3, 3, 3), (64, 128, 256, 512, 512), pool_last=True, final_head="mlp",
                  final_width=512, final_dropout=0.5),
    # The WideResNet-32-4 of SDN: pre-activation blocks with dropout 0.3, BatchNorm and ReLU only before the final
    # classifier (eejax.models.wide).
    "wrn32_4": Arch(WideBlock, (5, 5, 5), (64, 128, 256), stem=16, stem_norm=False, block_dropout=0.3,
                    final_head="preact"),
}


def get_arch(name: str) -> Arch:
  if name not in ARCHS:
    raise unknown_name("model", name, ARCHS)
  return ARCHS[name]


def check_image_size(name: str, hw: int) -> None:
  """A one-line error where `name`'s max-pools (VGG) would bring hw x hw images down to nothing."""
  arch = get_arch(name)
  halvings = sum(strides == 2 for _, strides in block_plan(arch, 1.0))
  if arch.pool_last and hw < 2 ** halvings:
    raise UserError(f"model.name={name} halves the image {halvings} times with max-pools, so it needs images of at "
                    f"least {2 ** halvings}x{2 ** halvings} pixels, and these are {hw}x{hw}; set "
                    f"data.image_size={2 ** halvings} (or more), or choose another model")


def block_plan(arch: Arch, width: float):
  """[(features, strides)] for every block, in order."""
  plan = []
  for stage, (n, w) in enumerate(zip(arch.stage_sizes, arch.stage_widths)):
    for i in range(n):
      halves = i == n - 1 if arch.pool_last else (stage > 0 and i == 0)
      plan.append((max(1, round(w * width)), 2 if halves else 1))
  return plan


def exit_points(arch: Arch, exit_after: Sequence[int] | None) -> tuple[int, ...]:
  """1-based block counts after which exits sit; the last block always has one.

  >>> exit_points(ARCHS["resnet20"], None)
  (3, 6, 9)
  >>> exit_points(ARCHS["resnet20"], [2, 5])
  (2, 5, 9)
  """
  num_blocks = sum(arch.stage_sizes)
  if exit_after is None:
    exit_after = list(itertools.accumulate(arch.stage_sizes))
  points = sorted(set(int(b) for b in exit_after) | {num_blocks})
  if points[0] < 1 or points[-1] > num_blocks:
    raise UserError(f"model.exit_after={list(exit_after)} must hold block numbers in 1..{num_blocks}")
  return tuple(points)

