"""Exit heads: each maps features_BxHxWxC to logits_BxC.

A head is one `nn.Module` class with fields `num_classes`, `width`, `dropout`,
`dtype`, `__call__(h_BxHxWxC, train) -> logits_BxC` (float32; dropout, where
used, needs a 'dropout' rng when training), and a static
`macs(hwc, num_classes, width, count_padding)` giving its multiply-accumulates for one image.
Adding a head design is adding one class to `HEADS`.

MACs count convolutions and dense layers only. BatchNorm (foldable into the
preceding convolution at inference), ReLU, pooling and additions are not counted.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from eejax.models.layers import avg_pool, batch_norm, max_pool
from eejax.models.resnet import conv_macs


def global_avg_pool(h_BxHxWxC):
  return jnp.mean(h_BxHxWxC, axis=(1, 2))


class LinearHead(nn.Module):
  """Global average pool, then one dense layer (the ResNet classifier)."""
  num_classes: int
  width: int = 0  # unused; kept so every head takes the same fields
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BxHxWxC, train: bool = False):
    h = nn.Dropout(self.dropout, deterministic=not train)(global_avg_pool(h_BxHxWxC))
    logits_BxC = nn.Dense(self.num_classes, dtype=self.dtype)(h)
    return logits_BxC.astype(jnp.float32)

  @staticmethod
  def macs(hwc, num_classes, width=0, count_padding=True):
    del width, count_padding
    return hwc[2] * num_classes


class PreActHead(nn.Module):
  """BatchNorm and ReLU, then global average pool and one dense layer: a pre-activation network's classifier
  (the Wide ResNet's), whose blocks end without either."""
  num_classes: int
  width: int = 0  # unused
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BxHxWxC, train: bool = False):
    h = nn.relu(batch_norm(train, self.dtype)(h_BxHxWxC))
    h = nn.Dropout(self.dropout, deterministic=not train)(global_avg_pool(h))
    return nn.Dense(self.num_classes, dtype=self.dtype)(h).astype(jnp.float32)

  @staticmethod
  def macs(hwc, num_classes, width=0, count_padding=True):
    del width, count_padding
    return hwc[2] * num_classes


class MlpHead(nn.Module):
  """Global average pool, two hidden dense layers of `width` (each followed by ReLU and dropout), then the
  classifier: VGG's three dense layers (SDN's CIFAR VGG-16 ends with it, width 512, dropout 0.5)."""
  num_classes: int
  width: int = 512
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BxHxWxC, train: bool = False):
    h = global_avg_pool(h_BxHxWxC)
    for _ in range(2):
      h = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(nn.Dense(self.width, dtype=self.dtype)(h)))
    return nn.Dense(self.num_classes, dtype=self.dtype)(h).astype(jnp.float32)

  @staticmethod
  def macs(hwc, num_classes, width=512, count_padding=True):
    del count_padding
    return hwc[2] * width + width * width + width * num_classes


def _pool_size(hw: int, target: int) -> int:
  """Window of the average pool that brings an hw x hw map down to at most target x target."""
  return max(1, hw // target)


class PoolConvHead(nn.Module):
  """SDN-like head: avg-pool to about 4x4, 3x3 conv (width), BN, ReLU, pool, dense.

  Pooling first keeps the convolution cheap even on early, high-resolution
  feature maps: its cost is 16 * 9 * C * width MACs whatever H and W are.
  """
  num_classes: int
  width: int = 128
  dropout: float = 0.0
  dtype: Any = jnp.float32
  grid: int = 4

  @nn.compact
  def __call__(self, h_BxHxWxC, train: bool = False):
    p = _pool_size(h_BxHxWxC.shape[1], self.grid)
    h = nn.avg_pool(h_BxHxWxC, window_shape=(p, p), strides=(p, p))
    h = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(h)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(global_avg_pool(nn.relu(h)))
    logits_BxC = nn.Dense(self.num_classes, dtype=self.dtype)(h)
    return logits_BxC.astype(jnp.float32)

  @staticmethod
  def macs(hwc, num_classes, width=128, count_padding=True, grid=4):
    conv, _ = conv_macs(hwc[0] // _pool_size(hwc[0], grid), hwc[2], width, 3, 1, count_padding)
    return conv + width * num_classes


class ErdeHead(nn.Module):
  """The ERDE paper's exit: BatchNorm, ReLU, 2x2 average pool, dropout, dense on the flattened map."""
  num_classes: int
  width: int = 0  # unused
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BxHxWxC, train: bool = False):
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(h_BxHxWxC)
    h = nn.avg_pool(nn.relu(h), window_shape=(2, 2), strides=(2, 2))
    h = nn.Dropout(self.dropout, deterministic=not train)(h.reshape(h.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=self.dtype)(h).astype(jnp.float32)

  @staticmethod
  def macs(hwc, num_classes, width=0, count_padding=True):
    del width, count_padding
    return (hwc[0] // 2) * (hwc[1] // 2) * hwc[2] * num_classes


def conv1d_macs(length: int, kernel: int, stride: int, width: int, count_padding: bool = True) -> tuple[int, int]:
  """(MACs, output length) of a 'SAME' 1D convolution, one input channel to `width`, over `length` positions."""
  out = -(-length // stride)
  pad_lo = max((out - 1) * stride + kernel - length, 0) // 2
  taps = sum(kernel if count_padding else sum(0 <= i * stride - pad_lo + j < length for j in range(kernel))
             for i in range(out))
  return taps * width, out


class Conv1dHead(nn.Module):
  """BTS-EE's lightweight branch (our reading): global average pool to a C-vector, a 1D convolution
  along the channel axis (one input channel, `width` filters, kernel 3, stride 2, 'SAME'), ReLU,
  flatten, dense.

  It has no BatchNorm, so a branch trained on pooled features is the same
  function of the full feature map: BTS-EE trains it on cached features.
  """
  num_classes: int
  width: int = 8
  dropout: float = 0.0
  dtype: Any = jnp.float32
  kernel: int = 3
  stride: int = 2

  @nn.compact
  def __call__(self, h_BxHxWxC, train: bool = False):
    h_BxCx1 = global_avg_pool(h_BxHxWxC)[..., None]
    h = nn.relu(nn.Conv(self.width, (self.kernel,), strides=(self.stride,), padding="SAME", dtype=self.dtype)(h_BxCx1))
    h = nn.Dropout(self.dropout, deterministic=not train)(h.reshape(h.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=self.dtype)(h).astype(jnp.float32)

  @staticmethod
  def macs(hwc, num_classes, width=8, count_padding=True, kernel=3, stride=2):
    conv, out = conv1d_macs(hwc[2], kernel, stride, width, count_padding)
    return conv + out * width * num_classes


def sdn_window(hw: int) -> int:
  """SDN's feature reduction: the pooling window for an hw x hw map, int(hw / 4) from 4 up; 0 below (no pooling)."""
  return hw // 4 if hw >= 4 else 0


class SdnHead(nn.Module):
  """SDN's internal classifier (Kaya et al. 2019): a map of side s >= 4 is pooled with windows of int(s / 4),
  as alpha * max-pool + (1 - alpha) * average-pool with one learned alpha (drawn uniformly in [0, 1)), and the
  pooled map (about 4x4) goes flattened into one dense layer; a smaller map goes to the dense layer whole."""
  num_classes: int
  width: int = 0  # unused
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BxHxWxC, train: bool = False):
    k = sdn_window(h_BxHxWxC.shape[1])
    h = h_BxHxWxC
    if k:
      alpha = self.param("alpha", nn.initializers.uniform(1.0), (1,), jnp.float32).astype(h.dtype)
      h = alpha * max_pool(h, k) + (1 - alpha) * avg_pool(h, k)
    h = nn.Dropout(self.dropout, deterministic=not train)(h.reshape(h.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=self.dtype)(h).astype(jnp.float32)

  @staticmethod
  def macs(hwc, num_classes, width=0, count_padding=True):
    del width, count_padding
    k = sdn_window(hwc[0]) or 1
    return (hwc[0] // k) * (hwc[1] // k) * hwc[2] * num_classes


HEADS = {"linear": LinearHead, "pool_conv": PoolConvHead, "erde": ErdeHead, "conv1d": Conv1dHead, "mlp": MlpHead,
         "preact": PreActHead, "sdn": SdnHead}


def final_head(arch, width: float, head_dropout: float) -> tuple[type, int, float]:
  """(class, width, dropout) of a backbone's final classifier: its `final_head` (width scaled like its stages),
  with its own dropout where it names one, else `head_dropout`."""
  dropout = head_dropout if arch.final_dropout is None else arch.final_dropout
  return HEADS[arch.final_head], max(1, round(arch.final_width * width)), dropout
