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


def test_schedule_warms_up_then_decays_to_zero():
  config = cifar10.get_config("smoke")
  config.train.update(epochs=4, warmup_epochs=1.0, learning_rate=0.2)
  schedule = state.make_schedule(config.train, 10)  # 40 steps, 10 of warm-up
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10, 25, 40)],
                             [0.0, 0.1, 0.2, 0.2 * 0.5 * (1 + np.cos(np.pi * 15 / 30)), 0.0], atol=1e-7)


def test_scan_chunk_of_one_step_has_no_loop_and_a_leading_axis():
  step = lambda c, x: (c + x, {"c": c})
  c, m = state.scan_chunk(step, 1, unroll=1)(np.float32(1.0), np.float32(2.0))
  assert float(c) == 3.0 and m["c"].shape == (1,)
  c, m = state.scan_chunk(step, 3, unroll=1)(np.float32(1.0), np.float32(2.0))
  assert float(c) == 7.0 and m["c"].tolist() == [1.0, 3.0, 5.0]
