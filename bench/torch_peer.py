"""The peer: eejax's multi-exit ResNets, MobileNet, VGG and Wide ResNet and the joint training step, written idiomatically in PyTorch.

Only the benchmarks import this (`pip install -e '.[bench]'` brings torch); the
package never does. Same function as `eejax.models.MultiExitNet` with linear
heads: 3x3 stem, basic or bottleneck blocks with projection shortcuts (or
MobileNet's depthwise-separable blocks, VGG's convolutions with a max-pool
ending each stage and its three-layer classifier, or the Wide ResNet's
pre-activation blocks), an exit
(global average pool + linear) after each stage. Strided 3x3 convolutions pad
like XLA's SAME (0 before, 1 after on even sizes) so that both compute the same
function; `load_flax` copies eejax's parameters in to check that they do.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Conv(nn.Module):
  """k x k convolution without bias, SAME padding as XLA computes it."""

  def __init__(self, c_in, c_out, k, stride=1, groups=1):
    super().__init__()
    self.stride, self.k = stride, k
    self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=k // 2 if stride == 1 else 0, groups=groups, bias=False)

  def forward(self, x):
    if self.stride > 1 and self.k > 1:
      total = max((-(-x.shape[-1] // self.stride) - 1) * self.stride + self.k - x.shape[-1], 0)
      x = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
    return self.conv(x)


def bn(c):
  return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)  # = flax momentum 0.9


class Basic(nn.Module):
  expansion = 1

  def __init__(self, c_in, c, stride):
    super().__init__()
    self.conv1, self.bn1 = Conv(c_in, c, 3, stride), bn(c)
    self.conv2, self.bn2 = Conv(c, c, 3), bn(c)
    self.proj = None if (stride == 1 and c_in == c) else nn.Sequential(Conv(c_in, c, 1, stride), bn(c))

  def forward(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    return F.relu(h + (x if self.proj is None else self.proj(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, c_in, c, stride):
    super().__init__()
    self.conv1, self.bn1 = Conv(c_in, c, 1), bn(c)
    self.conv2, self.bn2 = Conv(c, c, 3, stride), bn(c)
    self.conv3, self.bn3 = Conv(c, 4 * c, 1), bn(4 * c)
    self.proj = None if (stride == 1 and c_in == 4 * c) else nn.Sequential(Conv(c_in, 4 * c, 1, stride), bn(4 * c))

  def forward(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = F.relu(self.bn2(self.conv2(h)))
    h = self.bn3(self.conv3(h))
    return F.relu(h + (x if self.proj is None else self.proj(x)))


class Separable(nn.Module):
  """MobileNet's depthwise-separable block: 3x3 depthwise (the stride), BN, ReLU, 1x1 pointwise, BN, ReLU."""
  expansion = 1

  def __init__(self, c_in, c, stride):
    super().__init__()
    self.conv1, self.bn1 = Conv(c_in, c_in, 3, stride, groups=c_in), bn(c_in)
    self.conv2, self.bn2 = Conv(c_in, c, 1), bn(c)

  def forward(self, x):
    return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Vgg(nn.Module):
  """VGG's block: 3x3 convolution, BN, ReLU; stride 2 means a 2x2 max-pool after it (a stage's end)."""
  expansion = 1

  def __init__(self, c_in, c, stride):
    super().__init__()
    self.conv1, self.bn1, self.pool = Conv(c_in, c, 3), bn(c), stride == 2

  def forward(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    return F.max_pool2d(h, 2) if self.pool else h


class Wide(nn.Module):
  """The Wide ResNet's pre-activation block: BN, ReLU, 3x3 conv, dropout, BN, ReLU, 3x3 conv (the stride), plus the
  input (through a 1x1 convolution where the shape changes)."""
  expansion = 1

  def __init__(self, c_in, c, stride, dropout=0.0):
    super().__init__()
    self.bn1, self.conv1, self.drop = bn(c_in), Conv(c_in, c, 3), nn.Dropout(dropout)
    self.bn2, self.conv2 = bn(c), Conv(c, c, 3, stride)
    self.proj = None if (stride == 1 and c_in == c) else Conv(c_in, c, 1, stride)

  def forward(self, x):
    h = self.drop(self.conv1(F.relu(self.bn1(x))))
    h = self.conv2(F.relu(self.bn2(h)))
    return h + (x if self.proj is None else self.proj(x))


def mlp(c_in, width, num_classes, dropout):
  """VGG's classifier: two hidden dense layers (ReLU, dropout after each), then the output layer."""
  return nn.Sequential(nn.Linear(c_in, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width), nn.ReLU(),
                       nn.Dropout(dropout), nn.Linear(width, num_classes))


class MultiExitResNet(nn.Module):
  """Exits after every stage (or only the last, single_exit=True); forward returns logits E x B x C."""

  def __init__(self, block, stage_sizes, plan, stem_width, num_classes=10, single_exit=False, head_dropout=0.0,
               exit_grad_scale=1.0, final_mlp=None, preact=False, block_dropout=0.0):
    """plan: eejax's `block_plan`, (features, strides) per block; final_mlp: (width, dropout) of VGG's classifier;
    preact: no BatchNorm after the stem, BN and ReLU before the final classifier (the Wide ResNet); block_dropout:
    dropout inside each block (the Wide ResNet's)."""
    super().__init__()
    self.head_dropout, self.exit_grad_scale, self.final_mlp = head_dropout, exit_grad_scale, final_mlp
    c_in, plan = stem_width, iter(plan)
    self.stem, self.stem_bn = Conv(3, c_in, 3), None if preact else bn(c_in)
    self.stages, self.heads = nn.ModuleList(), nn.ModuleList()
    for s, n in enumerate(stage_sizes):
      blocks = []
      for w, stride in (next(plan) for _ in range(n)):
        blocks.append(block(c_in, w, stride, **({"dropout": block_dropout} if block_dropout else {})))
        c_in = w * block.expansion
      self.stages.append(nn.Sequential(*blocks))
      last = s == len(stage_sizes) - 1
      head = mlp(c_in, final_mlp[0], num_classes, final_mlp[1]) if last and final_mlp else nn.Linear(c_in, num_classes)
      self.heads.append(head if (last or not single_exit) else None)
    self.final_bn = bn(c_in) if preact else None  # registered after the blocks: load_flax copies in this order
  def forward(self, x):
    h, out = self.stem(x), []
    h = h if self.stem_bn is None else F.relu(self.stem_bn(h))
    for s, (stage, head) in enumerate(zip(self.stages, self.heads)):
      h = stage(h)
      if head is not None:
        last, to_head = s == len(self.stages) - 1, h
        if not last and self.exit_grad_scale != 1.0:  # the early exit's gradient, scaled
          to_head = h.detach() + self.exit_grad_scale * (h - h.detach())
        if last and self.final_bn is not None:
          to_head = F.relu(self.final_bn(h))
        pooled = to_head.mean((2, 3))
        out.append(head(pooled if last and self.final_mlp else F.dropout(pooled, self.head_dropout, self.training)))
    return torch.stack(out)


def build(arch, width=1.0, single_exit=False, num_classes=10, head_dropout=0.0, exit_grad_scale=1.0,
          zero_init_residual=False, flax_init=False):
  """The peer of eejax's `arch`; `zero_init_residual` starts each block's last BatchNorm scale at 0 and `flax_init`
  draws the kernels as flax does (`init_like_flax`), as eejax does."""
  from eejax.models import heads, mobilenet, resnet, vgg, wide  # pylint: disable=g-import-not-at-top
  spec = resnet.ARCHS[arch]
  block = {resnet.BasicBlock: Basic, resnet.BottleneckBlock: Bottleneck,
           mobilenet.DepthwiseSeparableBlock: Separable, vgg.ConvBlock: Vgg,
           wide.WideBlock: Wide}[spec.block]
  final_cls, final_width, final_dropout = heads.final_head(spec, width, head_dropout)
  stem_width = max(1, round(spec.stem_width * width))
  model = MultiExitResNet(block, spec.stage_sizes, resnet.block_plan(spec, width), stem_width, num_classes,
                          single_exit, head_dropout, exit_grad_scale,
                          final_mlp=(final_width, final_dropout) if final_cls is heads.MlpHead else None,
                          preact=final_cls is heads.PreActHead, block_dropout=spec.block_dropout)
  if zero_init_residual:
    for m in model.modules():
      if isinstance(m, (Basic, Bottleneck)):
        nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)
  if flax_init:
    init_like_flax(model)
  return model


def init_like_flax(model):
  """Every convolution and dense kernel drawn as flax's default (lecun_normal: a normal of variance 1/fan_in,
  truncated at two standard deviations), every bias 0, where PyTorch draws uniform kernels of variance
  1/(3 fan_in) and uniform biases: the distribution eejax starts from."""
  for m in model.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      std = m.weight[0].numel() ** -0.5 / 0.87962566103423978  # the truncated normal's own std is 0.8796 of this
      nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
      if m.bias is not None:
        nn.init.zeros_(m.bias)


def load_flax(model, variables):
  """Copies eejax parameters and BatchNorm statistics (same architecture) into `model`, in order."""
  def leaves(tree, kind):
    out = []
    def walk(node, path):
      if isinstance(node, dict):
        for key in sorted(node, key=_natural):
          walk(node[key], path + (key,))
      else:
        out.append((path, np.asarray(node)))
    walk(tree, ())
    return out
  convs = [a for p, a in leaves(variables["params"], "p") if p[-1] == "kernel" and a.ndim == 4]
  dense = [(p, a) for p, a in leaves(variables["params"], "p") if p[-2].startswith("Dense")]
  scales = [a for p, a in leaves(variables["params"], "p") if p[-1] == "scale"]
  biases = [a for p, a in leaves(variables["params"], "p") if p[-1] == "bias" and "BatchNorm" in p[-2]
            or p[-2] == "stem_norm" and p[-1] == "bias"]
  means = [a for p, a in leaves(variables["batch_stats"], "s") if p[-1] == "mean"]
  variances = [a for p, a in leaves(variables["batch_stats"], "s") if p[-1] == "var"]
  t_convs = [m.conv for m in model.modules() if isinstance(m, Conv)]
  t_bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  t_dense = [m for h in model.heads if h is not None for m in h.modules() if isinstance(m, nn.Linear)]
  assert len(convs) == len(t_convs) and len(scales) == len(t_bns) == len(means), (len(convs), len(t_convs))
  with torch.no_grad():
    for src, dst in zip(convs, t_convs):
      dst.weight.copy_(torch.from_numpy(src.transpose(3, 2, 0, 1).copy()))
    for g, b, m, v, dst in zip(scales, biases, means, variances, t_bns):
      for name, value in (("weight", g), ("bias", b), ("running_mean", m), ("running_var", v)):
        getattr(dst, name).copy_(torch.from_numpy(value.copy()))
    kernels = [a for p, a in dense if p[-1] == "kernel"]
    dense_b = [a for p, a in dense if p[-1] == "bias"]
    assert len(kernels) == len(t_dense), (len(kernels), len(t_dense))
    for k, b, dst in zip(kernels, dense_b, t_dense):
      dst.weight.copy_(torch.from_numpy(k.T.copy()))
      dst.bias.copy_(torch.from_numpy(b.copy()))


def _natural(key):
  """Sort blocks_10 after blocks_9, and the flax submodule order (Conv_0 before BatchNorm_0 within a block)."""
  import re  # pylint: disable=g-import-not-at-top
  order = {"stem_conv": 0, "stem_norm": 1}
  parts = re.split(r"(\d+)", key)
  return (order.get(key, 2), [int(p) if p.isdigit() else p for p in parts])
