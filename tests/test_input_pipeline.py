"""On-device sampling and augmentation, against numpy references."""
import jax
import jax.numpy as jnp
import numpy as np

from eejax import input_pipeline


def test_batch_indices_cover_each_epoch_once_and_change_between_epochs():
  key, n, b = jax.random.key(0), 50, 8
  steps = n // b
  epoch0 = np.concatenate([input_pipeline.batch_indices(key, s, num_examples=n, batch_size=b) for s in range(steps)])
  epoch1 = np.concatenate([input_pipeline.batch_indices(key, s, num_examples=n, batch_size=b)
                           for s in range(steps, 2 * steps)])
  assert len(set(epoch0.tolist())) == steps * b and epoch0.max() < n
  assert not np.array_equal(epoch0, epoch1)
  jitted = jax.jit(lambda s: input_pipeline.batch_indices(key, s, num_examples=n, batch_size=b))
  np.testing.assert_array_equal(jitted(jnp.int32(steps + 2)), epoch1[2 * b:3 * b])  # pure function of (key, step)
  perm1 = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), n))
  np.testing.assert_array_equal(epoch1, perm1[:steps * b])


def test_random_crop_flip_matches_numpy():
  key = jax.random.key(3)
  x = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
  out = np.asarray(jax.jit(lambda k, x: input_pipeline.random_crop_flip(k, x, pad=2))(key, x))
  crop_key, flip_key = jax.random.split(key)
  dy, dx = np.asarray(jax.random.randint(crop_key, (2, 6), 0, 5))
  flips = np.asarray(jax.random.bernoulli(flip_key, 0.5, (6,)))
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(6):
    ref = padded[i, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
    ref = ref[:, ::-1] if flips[i] else ref
    np.testing.assert_array_equal(out[i], ref)
  assert 0 < flips.sum() < 6  # both branches exercised
  np.testing.assert_array_equal(input_pipeline.random_crop_flip(key, x, pad=0, flip=False), x)


def test_normalize_and_channel_stats():
  x = np.random.default_rng(1).integers(0, 255, (5000, 4, 4, 3), dtype=np.uint8)
  mean, std = input_pipeline.channel_stats(x)
  ref = x.astype(np.float64) / 255
  np.testing.assert_allclose(mean, ref.mean((0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std, ref.std((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(input_pipeline.normalize(x[:3], mean, std), (ref[:3] - mean) / std, rtol=1e-5, atol=1e-5)
