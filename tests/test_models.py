"""Multi-exit ResNets: shapes, parameter counts against published figures, errors."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eejax.errors import UserError
from eejax.models import ARCHS, HEADS, MultiExitNet
from eejax.models.resnet import block_plan, exit_points
from eejax.models.layers import avg_pool, max_pool
from eejax.models.vgg import ConvBlock
from eejax.models.wide import WideBlock


def n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("head", sorted(HEADS))
def test_shapes_all_exits(arch, head):
  model = MultiExitNet(arch, num_classes=7, width=0.125 if ARCHS[arch].stem_width == 64 else 0.5, head=head,
                       head_width=8)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  (logits, aux) = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  num_exits = len(ARCHS[arch].stage_sizes)
  assert logits.shape == (num_exits, 2, 7)
  assert logits.dtype == jnp.float32
  assert len(aux["features"]) == num_exits
  assert aux["features"][-1].shape[1] == 32 // 2 ** (num_exits - (0 if ARCHS[arch].pool_last else 1))


@pytest.mark.parametrize("arch,expected", [("resnet18", 11_173_962), ("resnet50", 23_520_842),
                                           ("mobilenet", 3_217_226)])
def test_parameter_count_matches_published_single_exit(arch, expected):
  # The widely used PyTorch CIFAR ResNet-18/50 (3x3 stem, projection shortcuts, 10 classes) and MobileNet (v1, as
  # in SDN) have 11,173,962 / 23,520,842 / 3,217,226 parameters. Ours adds one dense layer per early exit.
  model = MultiExitNet(arch, 10)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  expansion = ARCHS[arch].block.expansion
  extra = sum(w * expansion * 10 + 10 for w in ARCHS[arch].stage_widths[:-1])
  assert n_params(variables["params"]) == expected + extra


def test_jit_and_eager_agree_and_train_updates_batch_stats():
  model = MultiExitNet("resnet8", 5, width=0.5, head="pool_conv", head_width=8)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  variables = model.init(jax.random.key(0), x)
  eager, _ = model.apply(variables, x)
  jitted, _ = jax.jit(model.apply)(variables, x)
  chex.assert_shape(eager, (3, 4, 5))
  np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_segments_reproduce_the_full_forward():
  model = MultiExitNet("resnet20", 4, width=0.5, exit_after=(2, 5, 7))
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  full, aux = model.apply(variables, x)

  def stepwise(module, x):
    h, out = module.stem(x), []
    for k in range(4):
      h, logits = module.segment(k, h)
      out.append(logits)
    return jnp.stack(out), h

  staged, h_last = model.apply(variables, x, method=stepwise)
  assert full.shape == (4, 3, 4)
  np.testing.assert_allclose(full, staged, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(aux["features"][-1], h_last, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = MultiExitNet("resnet8", 10, width=0.5, dtype=jnp.bfloat16)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
  logits, aux = model.apply(variables, x)
  assert logits.dtype == jnp.float32
  assert aux["features"][0].dtype == jnp.bfloat16


def test_exit_points():
  assert exit_points(ARCHS["resnet18"], None) == (2, 4, 6, 8)
  assert exit_points(ARCHS["resnet20"], [5, 2]) == (2, 5, 9)
  with pytest.raises(UserError, match="1..9"):
    exit_points(ARCHS["resnet20"], [0, 3])
  with pytest.raises(UserError, match="1..9"):
    exit_points(ARCHS["resnet20"], [10])


def test_unknown_names_list_the_valid_ones():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(UserError, match=r"unknown model 'resnet19'; valid: .*resnet18.*resnet20"):
    MultiExitNet("resnet19", 10).init(jax.random.key(0), x)
  with pytest.raises(UserError, match=r"unknown head 'mpl'; valid: conv1d, erde, linear, mlp, pool_conv, preact"):
    MultiExitNet("resnet8", 10, head="mpl").init(jax.random.key(0), x)


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_exit_grad_scale_scales_what_early_exits_send_into_the_backbone(scale):
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  joint = MultiExitNet("resnet8", 5, width=0.5, head="pool_conv", head_width=8)
  scaled = joint.clone(exit_grad_scale=scale)
  variables = joint.init(jax.random.key(0), x)

  def grads(model, exit_k):  # d(sum of exit k's logits) / d(parameters)
    return jax.grad(lambda p: model.apply({**variables, "params": p}, x)[0][exit_k].sum())(variables["params"])

  np.testing.assert_array_equal(joint.apply(variables, x)[0], scaled.apply(variables, x)[0])  # same forward
  g_joint, g_scaled = grads(joint, 0), grads(scaled, 0)
  stem = lambda g: np.asarray(g["stem_conv"]["kernel"])
  head = lambda g: jax.tree.leaves(g["heads_0"])
  assert np.abs(stem(g_joint)).max() > 0
  np.testing.assert_allclose(stem(g_scaled), scale * stem(g_joint), rtol=1e-5, atol=1e-7)  # the backbone: scaled
  for a, b in zip(head(g_joint), head(g_scaled)):  # the head itself learns as before
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # The final exit is never scaled: its gradient into the backbone is the joint one.
  np.testing.assert_allclose(stem(grads(scaled, -1)), stem(grads(joint, -1)), rtol=1e-6)


def test_mobilenet_by_hand():
  # SDN's CIFAR MobileNet: 32-channel stem, then (channels, stride) per block, no shortcut, 2x2 at the end.
  plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2), (1024, 1)]
  assert block_plan(ARCHS["mobilenet"], 1.0) == plan and ARCHS["mobilenet"].stem_width == 32
  assert exit_points(ARCHS["mobilenet"], None) == (1, 3, 5, 11, 13)
  model = MultiExitNet("mobilenet", 10, width=0.25)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  block = variables["params"]["blocks_1"]  # 16 -> 32 channels at width 0.25, stride 2
  assert block["Conv_0"]["kernel"].shape == (3, 3, 1, 16) and block["Conv_1"]["kernel"].shape == (1, 1, 16, 32)
  # Every BatchNorm scale starts at 1: with no shortcut, a zero scale would cut the signal.
  scales = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
            if path[-1].key == "scale"]
  assert scales and all(np.all(s == 1) for s in scales)
  logits, aux = model.apply(variables, x)
  assert logits.shape == (5, 2, 10) and [f.shape[1:] for f in aux["features"]] == [
      (32, 32, 16), (16, 16, 32), (8, 8, 64), (4, 4, 128), (2, 2, 256)]
  assert np.all(np.std(np.asarray(logits[-1]), axis=-1) > 0)  # the signal reaches the final exit


def test_vgg16_by_hand():
  # SDN's CIFAR VGG-16 (BatchNorm): the stem is its first 64-channel convolution; every stage ends in a 2x2
  # max-pool, so an exit after a stage sees the pooled map and the final one a 1x1x512 map.
  plan = [(64, 2), (128, 1), (128, 2), *[(256, 1)] * 2, (256, 2), *[(512, 1)] * 2, (512, 2), *[(512, 1)] * 2, (512, 2)]
  assert block_plan(ARCHS["vgg16"], 1.0) == plan and ARCHS["vgg16"].stem_width == 64
  assert exit_points(ARCHS["vgg16"], None) == (1, 3, 6, 9, 12)
  # Single exit: 13 convolutions without bias, their BatchNorm's scale and shift, and dense 512, 512, 10.
  c = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  want = sum(9 * a * b for a, b in zip(c, c[1:])) + 2 * sum(c[1:]) + 512 * 513 * 2 + 513 * 10
  variables = jax.eval_shape(MultiExitNet("vgg16", 10, exit_after=(12,)).init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  assert n_params(variables["params"]) == want == 15_249_354
  model = MultiExitNet("vgg16", 10, width=0.125)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables["params"]["heads_4"]) == {  # the classifier, scaled like the stages
      "Dense_0": {"kernel": (64, 64), "bias": (64,)}, "Dense_1": {"kernel": (64, 64), "bias": (64,)},
      "Dense_2": {"kernel": (64, 10), "bias": (10,)}}
  scales = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]) if path[-1].key == "scale"]
  assert len(scales) == 13 and all(np.all(s == 1) for s in scales)  # no shortcut: none starts at zero
  logits, aux = model.apply(variables, x)
  assert logits.shape == (5, 2, 10) and [f.shape[1:] for f in aux["features"]] == [
      (16, 16, 8), (8, 8, 16), (4, 4, 32), (2, 2, 64), (1, 1, 64)]
  # A stage's max-pool: exit 1's map is the 2x2 maximum of its convolution's output.
  stem = model.apply(variables, x, method=lambda m, x: m.stem(x))
  unpooled = ConvBlock(8, strides=1)  # the same parameters, without the pool
  conv = unpooled.apply({c: variables[c]["blocks_0"] for c in ("params", "batch_stats")}, stem)
  np.testing.assert_allclose(aux["features"][0], np.asarray(conv).reshape(2, 16, 2, 16, 2, 8).max((2, 4)), rtol=1e-6)
  # The classifier's dropout (0.5) acts in training only: two training passes differ, inference is deterministic.
  train = lambda key: model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0][0][-1]
  assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))


@pytest.mark.parametrize("hw,k", [(8, 2), (7, 2), (16, 4), (10, 3), (32, 8)])
def test_pools_equal_flax_pools(hw, k):
  # Written as pairwise maxima and a reshaped mean so that every export format runs them; a partial last window
  # of rows or columns is dropped, as flax's pools do.
  x = jax.random.normal(jax.random.key(0), (2, hw, hw + 2, 3))
  np.testing.assert_array_equal(max_pool(x, k), nn.max_pool(x, (k, k), strides=(k, k)))
  np.testing.assert_allclose(avg_pool(x, k), nn.avg_pool(x, (k, k), strides=(k, k)), rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_stays_finite_in_a_jitted_training_step():
  # A reshape and jnp.max gave NaN gradients here under jit on XLA:CPU (the count of entries equal to the maximum
  # came out 0): ResNet-8 with SDN heads, one step on uint8 images through the input pipeline.
  from eejax import input_pipeline, losses  # pylint: disable=g-import-not-at-top
  model = MultiExitNet("resnet8", 3, width=0.25, exit_after=(1, 2, 3), head="sdn")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  images = jax.random.randint(jax.random.key(1), (12, 16, 16, 3), 0, 255).astype(jnp.uint8)

  def loss(params, key):
    x = input_pipeline.random_crop_flip(key, images, pad=4, flip=True)
    x = input_pipeline.normalize(x, jnp.full(3, 120.0), jnp.full(3, 60.0))
    (logits, _), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                 mutable=["batch_stats"])
    return losses.cross_entropy(logits, jnp.arange(12) % 3).mean()
  grads = jax.jit(jax.grad(loss))(variables["params"], jax.random.key(5))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_wrn32_4_by_hand():
  # SDN's WideResNet-32-4: a 16-channel stem with no BatchNorm, 3 stages of 5 pre-activation blocks (64, 128, 256
  # channels, the stride on a block's second convolution), BatchNorm and ReLU before the pooled classifier.
  assert block_plan(ARCHS["wrn32_4"], 1.0) == [(64, 1)] * 5 + [(128, 2)] + [(128, 1)] * 4 + [(256, 2)] + [(256, 1)] * 4
  assert exit_points(ARCHS["wrn32_4"], None) == (5, 10, 15)
  # Single exit: convolutions without bias; two BatchNorms (scale and shift) a block, one before the classifier.
  c_in = [16] + [64] * 5 + [128] * 5 + [256] * 4
  c_out = [64] * 5 + [128] * 5 + [256] * 5
  blocks = sum(2 * a + 9 * a * b + 2 * b + 9 * b * b + (a * b if a != b else 0) for a, b in zip(c_in, c_out))
  want = 9 * 3 * 16 + blocks + 2 * 256 + 256 * 10 + 10
  variables = jax.eval_shape(MultiExitNet("wrn32_4", 10, exit_after=(15,)).init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  assert n_params(variables["params"]) == want == 7_399_130 and "stem_norm" not in variables["params"]
  model = MultiExitNet("wrn32_4", 10, width=0.25)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  # An identity block with its second convolution zeroed passes its input through unchanged (the shortcut).
  params = jax.tree.map(lambda a: a, variables["params"])
  params["blocks_1"]["Conv_1"]["kernel"] = jnp.zeros_like(params["blocks_1"]["Conv_1"]["kernel"])
  h = jax.random.normal(jax.random.key(2), (2, 32, 32, 16))
  block = {"params": params["blocks_1"], "batch_stats": variables["batch_stats"]["blocks_1"]}
  np.testing.assert_array_equal(WideBlock(16).apply(block, h), h)
  assert params["blocks_5"]["Conv_2"]["kernel"].shape == (1, 1, 16, 32)  # the 1x1 shortcut where the stage halves
  logits, aux = model.apply(variables, x)
  assert logits.shape == (3, 2, 10) and [f.shape[1:] for f in aux["features"]] == [
      (32, 32, 16), (16, 16, 32), (8, 8, 64)]
  # The early exits see the raw block output; the final one BatchNorm and ReLU of it first.
  assert "BatchNorm_0" in variables["params"]["heads_2"] and list(variables["params"]["heads_0"]) == ["Dense_0"]
  # Dropout (0.3) between a block's convolutions acts in training only.
  train = lambda key: model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0][0][0]
  assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))
  np.testing.assert_array_equal(model.apply(variables, x)[0], logits)
