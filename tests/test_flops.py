"""Analytic MACs: hand-computed values, and agreement with XLA's compiled cost analysis.

Tolerance: XLA's count also holds the element-wise work (BatchNorm, ReLU,
residual adds) that MACs leave out, so XLA's FLOPs / 2 must lie between the
analytic MACs (in-bounds taps only, as XLA counts convolutions) and that plus
the per-architecture margin in TOLERANCE, for every exit of every model. A
head alone is checked with an absolute margin: at most three MAC-equivalents
per element of its input (BatchNorm, ReLU and pooling of the input).
"""
import jax
import jax.numpy as jnp
import pytest

from eejax.flops import exit_macs
from eejax.models.heads import Conv1dHead
from eejax.models.mobilenet import DepthwiseSeparableBlock
from eejax.models import ARCHS, MultiExitNet
from eejax.models.resnet import conv_macs

# Measured excess of XLA over analytic (jax 0.10.2, CPU): 0.4-0.6% for ResNet-18/34, 1.3-1.6% for
# ResNet-50, 2.0-2.7% for ResNet-8/20, 3.5-9.2% for ResNet-56/110 (16 channels: element-wise work is
# a larger share of each layer, and deeper nets have more of it per MAC); MobileNet 9.1% at exit 1 falling to
# 1.9% at the last (a depthwise convolution does 9 MACs per output, so its BatchNorm and ReLU weigh more);
# VGG-16 1.2% at exit 1 falling to 0.25% (max-pools, as pairwise maxima, and BatchNorm); WRN-32-4
# 0.4% falling to 0.3%.
TOLERANCE = {"resnet18": 0.01, "resnet34": 0.01, "resnet50": 0.02, "resnet8": 0.03, "resnet20": 0.03,
             "resnet56": 0.06, "resnet110": 0.10, "mobilenet": 0.10, "vgg16": 0.02,
             "wrn32_4": 0.01}


def test_resnet8_by_hand():
  model = MultiExitNet("resnet8", 10, head="linear")
  m = exit_macs(model, (32, 32, 3))
  stem = 32 * 32 * 9 * 3 * 16
  block1 = 2 * 32 * 32 * 9 * 16 * 16
  block2 = 16 * 16 * 9 * 16 * 32 + 16 * 16 * 9 * 32 * 32 + 16 * 16 * 16 * 32  # + 1x1 projection
  block3 = 8 * 8 * 9 * 32 * 64 + 8 * 8 * 9 * 64 * 64 + 8 * 8 * 32 * 64
  assert m.backbone == (stem + block1, stem + block1 + block2, stem + block1 + block2 + block3)
  assert m.head == (160, 320, 640)
  assert m.cumulative == (m.backbone[0] + 160, m.backbone[1] + 480, m.backbone[2] + 1120)
  assert m.full == m.backbone[2] + 640


def test_depthwise_separable_block_by_hand():
  # 3x3 depthwise on 32 channels at stride 2 (16x16 out), then 1x1 from 32 to 64 channels.
  macs, hwc = DepthwiseSeparableBlock.macs((32, 32, 32), 64, 2)
  assert (macs, hwc) == (16 * 16 * 9 * 32 + 16 * 16 * 32 * 64, (16, 16, 64))
  m = exit_macs(MultiExitNet("mobilenet", 10, exit_after=(1,)), (32, 32, 3))
  stem, block1 = 32 * 32 * 9 * 3 * 32, 32 * 32 * 9 * 32 + 32 * 32 * 32 * 64
  assert m.backbone[0] == stem + block1 and m.head[0] == 64 * 10


def test_mobilenet_whole_by_hand():
  # SDN's CIFAR MobileNet written out: 3x3 stem to 32 channels, then (channels, stride) per block, each a 3x3
  # depthwise and a 1x1 pointwise convolution, then the classifier on 1024 channels.
  total, hw, c = 32 * 32 * 9 * 3 * 32, 32, 32
  for out, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
                      (512, 1), (512, 1), (1024, 2), (1024, 1)]:
    hw //= stride
    total += hw * hw * 9 * c + hw * hw * c * out
    c = out
  assert exit_macs(MultiExitNet("mobilenet", 10), (32, 32, 3)).full == total + 1024 * 10 == 46_354_432


def test_vgg16_whole_by_hand():
  # SDN's CIFAR VGG-16: 13 3x3 convolutions at full resolution within a stage, a 2x2 max-pool after convolutions
  # 2, 4, 7, 10 and 13 (not counted), then dense 512 -> 512 -> 512 -> 10 on the 1x1 map.
  total, hw, c = 0, 32, 3
  for out, pool in [(64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 1), (256, 2), (512, 1), (512, 1),
                    (512, 2), (512, 1), (512, 1), (512, 2)]:
    total += hw * hw * 9 * c * out
    hw, c = hw // pool, out
  m = exit_macs(MultiExitNet("vgg16", 10), (32, 32, 3))
  assert m.full == total + 512 * 512 + 512 * 512 + 512 * 10 == 313_725_952
  assert m.head[:4] == (640, 1280, 2560, 5120)  # linear early exits on the pooled maps' 64 ... 512 channels


def test_wrn32_4_whole_by_hand():
  # SDN's WideResNet-32-4: 3x3 stem to 16 channels, then per block two 3x3 convolutions (the stride on the second)
  # and a 1x1 shortcut convolution where the channels change; the classifier on 256 channels.
  total, hw, c = 32 * 32 * 9 * 3 * 16, 32, 16
  for out, stride in [(64, 1)] * 5 + [(128, 2)] + [(128, 1)] * 4 + [(256, 2)] + [(256, 1)] * 4:
    total += hw * hw * 9 * c * out  # the first convolution, at the input's size
    total += (hw // stride) ** 2 * 9 * out * out + ((hw // stride) ** 2 * c * out if c != out else 0)
    hw, c = hw // stride, out
  assert exit_macs(MultiExitNet("wrn32_4", 10), (32, 32, 3)).full == total + 256 * 10 == 1_185_335_808


def test_resnet18_matches_the_usual_figure():
  # CIFAR ResNet-18 is usually quoted at 0.56 G MACs (e.g. 556.65 M by thop, which counts the same layers).
  m = exit_macs(MultiExitNet("resnet18", 10), (32, 32, 3))
  assert 555e6 < m.full < 557e6


def test_conv_macs_valid_taps_by_hand():
  # 3x3 SAME on 4x4: per dimension 2 border outputs see 2 taps, 2 inner see 3: 10 taps, squared.
  assert conv_macs(4, 1, 1, 3, 1, count_padding=False) == (100, 4)
  assert conv_macs(4, 1, 1, 3, 1, count_padding=True) == (144, 4)
  # stride 2 on 4x4: outputs 2, XLA pads (0, 1): taps per dim 3 + 2.
  assert conv_macs(4, 2, 3, 3, 2, count_padding=False) == (25 * 6, 2)


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_analytic_equals_xla_within_tolerance(arch):
  head = {"resnet20": "pool_conv", "resnet50": "pool_conv", "resnet56": "erde", "resnet34": "sdn",
          "resnet18": "conv1d", "resnet110": "conv1d", "vgg16": "mlp", "wrn32_4": "pool_conv"}.get(arch, "linear")
  model = MultiExitNet(arch, 10, head=head, head_width=32)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
  analytic = exit_macs(model, (32, 32, 3), count_padding=False)
  h = jax.eval_shape(lambda v, x: model.apply(v, x, method=lambda m, x: m.stem(x)), variables, x)
  for k in range(len(analytic.cumulative)):

    def prefix(m, x, k=k):  # the network up to exit k: stem, segments 1..k with their heads
      h, out = m.stem(x), []
      for j in range(k + 1):
        h, logits = m.segment(j, h)
        out.append(logits)
      return out

    total = _xla_flops(lambda v, x: model.apply(v, x, method=prefix), variables, x)
    assert 0 <= total / 2 / analytic.cumulative[k] - 1 <= TOLERANCE[arch], (k, total / 2, analytic.cumulative[k])
    seg = lambda v, h, k=k: model.apply(v, h, method=lambda m, h: m.segment(k, h))
    h = jax.eval_shape(seg, variables, jnp.zeros(h.shape))[0]
    head_flops = _xla_flops(lambda v, f, k=k: model.apply(v, f, method=lambda m, f: m.heads[k](f)), variables,
                            jnp.zeros(h.shape))
    # A head alone is small next to the element-wise work on its input (BatchNorm, ReLU, pooling),
    # which XLA counts and MACs do not: allow at most 6 FLOPs (3 MACs) per input element on top.
    assert 0 <= head_flops / 2 - analytic.head[k] <= 3 * h.size, (k, head_flops / 2, analytic.head[k])


def test_conv1d_head_macs_by_hand():
  # C=16 channels, kernel 3, stride 2, 'SAME': 8 outputs, the last one with one padding tap.
  assert Conv1dHead.macs((4, 4, 16), 10, width=4) == 8 * 3 * 4 + 8 * 4 * 10
  assert Conv1dHead.macs((4, 4, 16), 10, width=4, count_padding=False) == (8 * 3 - 1) * 4 + 8 * 4 * 10
  # odd length 5: outputs at 0, 2, 4, no padding needed on the left? pad_total = 2*2+3-5 = 2 -> 1 each side.
  assert Conv1dHead.macs((1, 1, 5), 3, width=1, count_padding=False) == (2 + 3 + 2) + 3 * 3
