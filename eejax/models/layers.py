"""What every backbone's blocks share: BatchNorm as eejax uses it, and the MACs of a convolution."""
from typing import Any

import flax.linen as nn


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
