"""Wide ResNet blocks for the multi-exit network: pre-activation, with dropout between the two convolutions.

The WideResNet-32-4 of SDN (Kaya et al. 2019; Zagoruyko and Komodakis 2016):
a 3x3 stem of 16 channels with no BatchNorm after it, then 5 blocks in each of
three stages of 64, 128 and 256 channels (16 x the widening factor 4), then
BatchNorm and ReLU before the pooled classifier (the final head `preact`;
`eejax.models.resnet.ARCHS["wrn32_4"]`). A block is BN, ReLU, 3x3 conv,
dropout (0.3), BN, ReLU, 3x3 conv (with the stride), plus the input, through a
1x1 convolution where the shape changes. An early exit sees a block's output
as SDN's internal classifiers do, before any BatchNorm. The convolutions have
no bias (SDN's have one).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from eejax.models.layers import batch_norm, conv_macs


class WideBlock(nn.Module):
  """Pre-activation wide basic block; the stride is on its second convolution."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  dropout: float = 0.0
  expansion = 1

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool = False):
    conv = lambda *args: nn.Conv(self.features, *args, use_bias=False, dtype=self.dtype)
    h = conv((3, 3))(nn.relu(batch_norm(train, self.dtype)(x_BxHxWxC)))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv((3, 3), self.strides)(nn.relu(batch_norm(train, self.dtype)(h)))
    shortcut = x_BxHxWxC
    if shortcut.shape != h.shape:
      shortcut = conv((1, 1), self.strides)(x_BxHxWxC)
    return h + shortcut

  @staticmethod
  def macs(hwc, features, strides, count_padding=True):
    hw, c = hwc[0], hwc[2]
    m1, _ = conv_macs(hw, c, features, 3, 1, count_padding=count_padding)
    m2, hw_out = conv_macs(hw, features, features, 3, strides, count_padding=count_padding)
    proj = 0
    if strides != 1 or c != features:
      proj, _ = conv_macs(hw, c, features, 1, strides, count_padding=count_padding)
    return m1 + m2 + proj, (hw_out, hw_out, features)
