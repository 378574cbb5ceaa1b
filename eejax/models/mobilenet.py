"""MobileNet (v1) blocks for the multi-exit network: the depthwise-separable convolution.

The CIFAR MobileNet of SDN (Kaya et al. 2019) and of the common PyTorch CIFAR
code: a 3x3 stem of 32 channels at stride 1, then 13 blocks of
[64, (128, 2), 128, (256, 2), 256, (512, 2), 512 x 5, (1024, 2), 1024]
(`eejax.models.resnet.ARCHS["mobilenet"]`). A block has no shortcut, so no
BatchNorm scale starts at zero.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from eejax.models.layers import batch_norm, conv_macs


class DepthwiseSeparableBlock(nn.Module):
  """3x3 depthwise convolution (the stride), BN, ReLU; 1x1 pointwise convolution to `features`, BN, ReLU."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool = False):
    c = x_BxHxWxC.shape[-1]
    h = nn.Conv(c, (3, 3), self.strides, feature_group_count=c, use_bias=False, dtype=self.dtype)(x_BxHxWxC)
    h = nn.relu(batch_norm(train, self.dtype)(h))
    h = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype)(h)
    return nn.relu(batch_norm(train, self.dtype)(h))

  @staticmethod
  def macs(hwc, features, strides, count_padding=True):
    hw, c = hwc[0], hwc[2]
    per_channel, hw_out = conv_macs(hw, 1, 1, 3, strides, count_padding=count_padding)
    pointwise, _ = conv_macs(hw_out, c, features, 1, 1, count_padding=count_padding)
    return c * per_channel + pointwise, (hw_out, hw_out, features)
