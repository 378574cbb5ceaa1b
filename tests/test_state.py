"""The optimizer and schedule: the gradient clip, the layout older checkpoints have, warm-up then cosine."""
import jax
import numpy as np
import pytest

from configs import cifar10
from eejax import state


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_grad_clip_bounds_the_step_to_the_learning_rate_times_the_clip(clip):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  config = cifar10.get_config("smoke")
  config.train.update(grad_clip=clip, weight_decay=0.0, momentum=0.0, nesterov=False)
  tx = state.make_optimizer(config.train, lambda step: 0.1)
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  grads = {"w": jnp.full((3, 4), 2.0), "b": jnp.full(4, 2.0)}  # global norm 2 * 4 = 8
  updates, _ = tx.update(grads, tx.init(params), params)
  want = 0.1 * (clip if clip else 8.0)
  np.testing.assert_allclose(float(optax.tree.norm(updates)), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["b"]), -want / 8.0 * 2.0 * np.ones(4), rtol=1e-6)  # direction kept


def test_without_a_clip_the_optimizer_state_keeps_the_layout_older_checkpoints_have():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  config = cifar10.get_config("smoke")
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  older = optax.chain(optax.add_decayed_weights(5e-4, mask=mask),
                      optax.sgd(lambda step: 0.1, momentum=0.9, nesterov=True))
  ours = state.make_optimizer(config.train, lambda step: 0.1)
  assert jax.tree.structure(ours.init(params)) == jax.tree.structure(older.init(params))


@pytest.mark.parametrize("on", ["kernels", "all"])
def test_weight_decay_goes_to_kernels_or_to_every_parameter(on):
  # Plain SGD, lr 0.1, decay 0.5, zero gradient: a decayed parameter p moves by -0.1 * 0.5 * p, any other stays.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = cifar10.get_config("smoke")
  config.train.update(weight_decay=0.5, momentum=0.0, nesterov=False, weight_decay_on=on)
  tx = state.make_optimizer(config.train, lambda step: 0.1)
  params = {"conv": {"kernel": jnp.full((3, 3, 2, 4), 2.0), "bias": jnp.full(4, 2.0)},
            "bn": {"scale": jnp.full(4, 2.0), "bias": jnp.full(4, 2.0)}}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    decayed = on == "all" or u.ndim > 1
    np.testing.assert_allclose(np.asarray(u), -0.1 * 0.5 * 2.0 if decayed else 0.0, err_msg=str(path))
  config.train.weight_decay_on = "kernels"
  kernels_only = state.make_optimizer(config.train, lambda step: 0.1)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(kernels_only.init(params))  # one layout


def test_schedule_warms_up_then_decays_to_zero():
  config = cifar10.get_config("smoke")
  config.train.update(epochs=4, warmup_epochs=1.0, learning_rate=0.2)
  schedule = state.make_schedule(config.train, 10)  # 40 steps, 10 of warm-up
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10, 25, 40)],
                             [0.0, 0.1, 0.2, 0.2 * 0.5 * (1 + np.cos(np.pi * 15 / 30)), 0.0], atol=1e-7)


def test_a_warm_up_under_one_step_is_none_and_a_one_step_run_has_a_schedule():
  # A 200-image run at batch 128 has one step an epoch; the cpu preset's half-epoch warm-up is then 0 steps, which
  # once ended in optax's "cosine_decay_schedule requires positive decay_steps" and a traceback.
  config = cifar10.get_config("cpu")
  config.train.update(epochs=1, learning_rate=0.2)
  assert float(state.make_schedule(config.train, 1)(0)) == np.float32(0.2)
  config.train.update(epochs=4, warmup_epochs=0.0)
  schedule = state.make_schedule(config.train, 10)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 10, 40)],
                             [0.2, 0.2 * 0.5 * (1 + np.cos(np.pi * 10 / 40)), 0.0], atol=1e-7)


def test_the_step_schedule_steps_once_for_each_listed_epoch_and_says_which_it_never_reaches():
  config = cifar10.get_config("smoke")
  config.train.update(epochs=10, warmup_epochs=1.0, learning_rate=1.0, schedule="step", step_factor=0.1,
                      step_epochs=(4, 7, 7))  # 7 twice: two steps there (a dict of boundaries kept one)
  schedule = state.make_schedule(config.train, 10)  # 100 steps, 10 of warm-up; epoch 4 steps from step 40 on
  np.testing.assert_allclose([float(schedule(s)) for s in (5, 10, 39, 40, 69, 70, 99)],
                             [0.5, 1.0, 1.0, 0.1, 0.1, 0.001, 0.001], rtol=1e-6)
  config.train.step_epochs = (4.01, 4.02)  # two epochs on one step (10 steps an epoch): both step
  np.testing.assert_allclose(float(state.make_schedule(config.train, 10)(40)), 0.01, rtol=1e-6)
  assert state.schedule_warning(config.train) is None
  config.train.update(epochs=5, step_epochs=(3, 5, 8.5))
  assert state.schedule_warning(config.train) == (
      "warning: the learning rate never steps at epoch(s) 5, 8.5 of train.step_epochs: the run ends after 5; give "
      "earlier ones for a shorter run")
  config.train.schedule = "cosine"
  assert state.schedule_warning(config.train) is None
  config.train.update(epochs=1, warmup_epochs=1.0)  # the preset's warm-up under --config.train.epochs=1
  schedule = state.make_schedule(config.train, 10)
  assert float(schedule(9)) == pytest.approx(0.9)  # the last step still warming up: no step at a lower rate
  assert state.schedule_warning(config.train) == (
      "warning: the warm-up lasts the whole run (train.warmup_epochs=1, train.epochs=1): the learning rate rises to "
      "its peak at the end and never decays; give a shorter warm-up for a short run")
  config.train.warmup_epochs = 0.5
  assert state.schedule_warning(config.train) is None


def test_scan_chunk_of_one_step_has_no_loop_and_a_leading_axis():
  step = lambda c, x: (c + x, {"c": c})
  c, m = state.scan_chunk(step, 1, unroll=1)(np.float32(1.0), np.float32(2.0))
  assert float(c) == 3.0 and m["c"].shape == (1,)
  c, m = state.scan_chunk(step, 3, unroll=1)(np.float32(1.0), np.float32(2.0))
  assert float(c) == 7.0 and m["c"].tolist() == [1.0, 3.0, 5.0]


def test_pytorch_init_draws_kernels_and_their_biases_as_pytorch_and_keeps_the_rest():
  # PyTorch's default Conv2d/Linear draw: uniform within +-1/sqrt(fan_in) for the weight and the bias beside it,
  # fan_in = in_channels / groups x kernel area; BatchNorm starts at scale 1 (0 where eejax zero-inits), shift 0.
  from eejax.models import MultiExitNet  # pylint: disable=g-import-not-at-top
  model = MultiExitNet("mobilenet", 10, width=0.5, head="pool_conv", head_width=16)
  tx = state.make_optimizer(cifar10.get_config("smoke").train, lambda step: 0.1)
  flax_state = state.init_state(model, tx, jax.random.key(0), (32, 32, 3))
  torch_state = state.init_state(model, tx, jax.random.key(0), (32, 32, 3), init="pytorch")
  seen = set()
  for (path, ours), (_, before) in zip(jax.tree_util.tree_leaves_with_path(torch_state.params),
                                       jax.tree_util.tree_leaves_with_path(flax_state.params)):
    names = [p.key for p in path]
    ours, before = np.asarray(ours), np.asarray(before)
    if names[-2].startswith(("Conv", "Dense", "stem_conv")):
      kernel = np.asarray(flax_state.params[names[0]][names[1]]["kernel"] if len(names) == 3
                          else flax_state.params[names[0]]["kernel"])
      bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))  # the depthwise kernel (3, 3, 1, C): fan_in 9
      assert np.abs(ours).max() <= bound and not np.array_equal(ours, before), names
      if ours.size >= 5000:  # uniform(-b, b): standard deviation b / sqrt(3)
        assert np.std(ours) == pytest.approx(bound / np.sqrt(3), rel=0.05), names
      seen.add(kernel.shape[-2] == 1 and kernel.ndim == 4)
    else:  # BatchNorm: as flax made it
      np.testing.assert_array_equal(ours, before)
  assert seen == {True, False}  # depthwise and ordinary kernels were both redrawn
  # Same key, same draw; the optimizer state starts from the redrawn parameters.
  again = state.init_state(model, tx, jax.random.key(0), (32, 32, 3), init="pytorch")
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(torch_state.params)))


def test_compile_ahead_compiles_on_another_thread_and_runs_as_the_jitted_chunk_does():
  import threading  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  threads = []

  def step(carry, x):
    threads.append(threading.current_thread().name)  # runs while tracing: which thread traced the chunk
    return carry * 2.0 + x, carry.sum()

  chunk = state.scan_chunk(step, 3, unroll=1)
  carry, x = jnp.arange(4.0), jnp.float32(1.0)
  ahead = state.compile_ahead(chunk, carry, x)
  got_carry, got_metrics = ahead(carry, x)
  want_carry, want_metrics = chunk(jnp.arange(4.0), x)
  assert threads == ["eejax-compile-ahead"]  # traced once, on the compiling thread
  np.testing.assert_array_equal(np.asarray(got_carry), np.arange(4.0) * 8 + 7)  # c -> 2c + 1, three times
  np.testing.assert_array_equal(np.asarray(got_carry), np.asarray(want_carry))
  np.testing.assert_array_equal(np.asarray(got_metrics), np.asarray(want_metrics))
  assert carry.is_deleted()  # donated, as the jitted chunk's carry is


def test_compile_ahead_of_a_chunk_that_cannot_compile_raises_its_error_at_the_call():
  def step(carry, x):
    raise ValueError("no such step")

  ahead = state.compile_ahead(state.scan_chunk(step, 2, unroll=1), np.zeros(3, np.float32), np.float32(1.0))
  with pytest.raises(ValueError, match="no such step"):
    ahead(np.zeros(3, np.float32), np.float32(1.0))
