"""VGG blocks for the multi-exit network: a 3x3 convolution, and a stage that ends in a 2x2 max-pool.

The CIFAR VGG-16 (with BatchNorm) of SDN (Kaya et al. 2019): a 3x3 stem of 64
channels, then 12 convolutions of [64 | 128 x 2 | 256 x 3 | 512 x 3 | 512 x 3],
each stage ending in a 2x2 max-pool (32x32 inputs end at 1x1x512), then two
dense layers of 512 with ReLU and dropout 0.5 before the classifier
(`eejax.models.resnet.ARCHS["vgg16"]`, whose final head is `mlp`). An exit
after a stage sees the pooled map, as SDN's internal classifiers do. No
shortcut, so no BatchNorm scale starts at zero; the convolutions have no bias
(BatchNorm's shift takes its place).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from eejax.models.layers import batch_norm, conv_macs, max_pool


class ConvBlock(nn.Module):
  """3x3 convolution to `features`, BN, ReLU; with strides 2 (no other), then a 2x2 max-pool (a VGG stage's end)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool = False):
    h = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype)(x_BxHxWxC)
    h = nn.relu(batch_norm(train, self.dtype)(h))
    return max_pool(h, 2) if self.strides == 2 else h

  @staticmethod
  def macs(hwc, features, strides, count_padding=True):
    macs, hw = conv_macs(hwc[0], hwc[2], features, 3, 1, count_padding=count_padding)
    hw_out = hw // strides  # pooling is not counted
    return macs, (hw_out, hw_out, features)
