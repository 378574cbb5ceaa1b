"""What every backbone's blocks share: BatchNorm as eejax uses it, the MACs of a convolution, and pooling."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def conv_macs(hw, c_in, c_out, k, strides=1, count_padding=True):
  """(MACs, output size) of a k x k SAME convolution on an hw x hw x c_in map.

  count_padding=True counts every kernel tap, as papers do (H_out W_out k^2
  C_in C_out); False counts only taps that land inside the input, as XLA's
  cost analysis does.
  """
  hw_out = -(-hw // strides)
  if count_padding:
    taps = hw_out * k
  else:
    pad_lo = max((hw_out - 1) * strides + k - hw, 0) // 2
    taps = sum(0 <= o * strides + t - pad_lo < hw for o in range(hw_out) for t in range(k))
  return taps * taps * c_in * c_out, hw_out


def batch_norm(train: bool, dtype: Any, **kw):
  """BatchNorm with PyTorch's running-average momentum (0.1 of the batch) and epsilon. Statistics are computed in
  float32 by flax whatever `dtype` is."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, **kw)


def _windows(x_BxHxWxC, k: int):
  """x cropped to whole k x k windows (a partial last row or column of windows dropped, as nn.max_pool does)."""
  return x_BxHxWxC[:, :x_BxHxWxC.shape[1] // k * k, :x_BxHxWxC.shape[2] // k * k]


def max_pool(x_BxHxWxC, k: int):
  """k x k max-pool at stride k as pairwise maxima of strided slices, rows then columns: the same numbers as
  nn.max_pool, in operations every export format runs (ONNX Runtime has no 4D-window MaxPool, which is what
  jax2onnx makes of XLA's reduce_window), and with jnp.maximum's gradient. A reshape and jnp.max would give the
  same forward pass, but its gradient divides by the count of entries equal to the maximum, and XLA:CPU, which
  may compute that maximum and the entries in two fusions, left the count 0 (NaN gradients; jax 0.10.2)."""
  x = _windows(x_BxHxWxC, k)
  rows = x[:, 0::k]
  for i in range(1, k):
    rows = jnp.maximum(rows, x[:, i::k])
  out = rows[:, :, 0::k]
  for j in range(1, k):
    out = jnp.maximum(out, rows[:, :, j::k])
  return out


def avg_pool(x_BxHxWxC, k: int):
  """k x k average pool at stride k (partial windows dropped), as a reshape and a mean."""
  x = _windows(x_BxHxWxC, k)
  b, h, w, c = x.shape
  return x.reshape(b, h // k, k, w // k, k, c).mean(axis=(2, 4))
