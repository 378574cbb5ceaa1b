"""Analytic multiply-accumulates (MACs) of a multi-exit network, per image.

MACs count convolutions and dense layers; BatchNorm (foldable into the
preceding convolution at inference), ReLU, pooling and additions are not
counted. FLOPs would be 2 x MACs; this module never speaks of FLOPs.

The cost of answering at exit k (1-based) is `cumulative[k-1]`: the backbone up
to exit k plus every head 1..k, since each was tried on the way.
"""
import dataclasses

from eejax.models.heads import HEADS, final_head
from eejax.models.multi_exit import MultiExitNet
from eejax.models.resnet import block_plan, conv_macs, exit_points, get_arch


@dataclasses.dataclass(frozen=True)
class ExitMacs:
  backbone: tuple[int, ...]  # backbone MACs from the input up to exit k
  head: tuple[int, ...]  # each head alone
  cumulative: tuple[int, ...]  # backbone up to exit k + heads 1..k
  full: int  # the plain network: whole backbone + final classifier, no other exits


def exit_macs(model: MultiExitNet, image_hwc: tuple[int, int, int], count_padding: bool = True) -> ExitMacs:
  """Per-exit MACs for one image of shape image_hwc (H, W, 3).

  count_padding=True (the default, and every number eejax reports) counts the
  zero-padding taps of convolutions as the papers do; False counts what XLA's
  cost analysis counts, for cross-checking.
  """
  arch = get_arch(model.arch)
  points = exit_points(arch, model.exit_after)
  stem_width = max(1, round(arch.stem_width * model.width))
  hw = image_hwc[0]
  total, _ = conv_macs(hw, image_hwc[2], stem_width, 3, 1, count_padding)
  hwc = (hw, hw, stem_width)
  backbone_after_block = []
  for features, strides in block_plan(arch, model.width):
    macs, hwc = arch.block.macs(hwc, features, strides, count_padding)
    total += macs
    backbone_after_block.append((total, hwc))
  backbone, head = [], []
  for k, point in enumerate(points):
    total_k, hwc_k = backbone_after_block[point - 1]
    head_cls, head_width = HEADS[model.head], model.head_width
    if k == len(points) - 1:
      head_cls, head_width, _ = final_head(arch, model.width, model.head_dropout)
    backbone.append(total_k)
    head.append(head_cls.macs(hwc_k, model.num_classes, head_width, count_padding))
  cumulative = [b + sum(head[:k + 1]) for k, b in enumerate(backbone)]
  return ExitMacs(tuple(backbone), tuple(head), tuple(cumulative), backbone[-1] + head[-1])
