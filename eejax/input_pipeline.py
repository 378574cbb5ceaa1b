"""The input pipeline on the accelerator: sampling and augmentation inside jit.

The whole training set lives on the device as uint8. A training step draws its
batch by index: the order is a permutation that is a pure function of
(data_key, epoch), so a resumed run sees the same batches as an uninterrupted
one. Crop-with-padding and horizontal flip run on the device too.
"""
import jax
import jax.numpy as jnp


def batch_indices(data_key, step, *, num_examples: int, batch_size: int):
  """Indices_B of training step `step` (any int scalar, traced or not).

  Epoch e = step // steps_per_epoch is a fresh permutation of all examples,
  seeded by fold_in(data_key, e); the last num_examples % batch_size examples
  of each epoch's order are dropped.
  """
  steps_per_epoch = num_examples // batch_size
  epoch, offset = step // steps_per_epoch, step % steps_per_epoch
  perm_N = jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)
  return jax.lax.dynamic_slice_in_dim(perm_N, offset * batch_size, batch_size)


def random_crop_flip(key, x_BxHxWxC, *, pad: int = 4, flip: bool = True):
  """Per-image random crop of a zero-padded image (same size back) and h-flip."""
  b, h, w, _ = x_BxHxWxC.shape
  crop_key, flip_key = jax.random.split(key)
  if pad:
    padded = jnp.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy_B, dx_B = jax.random.randint(crop_key, (2, b), 0, 2 * pad + 1)
    crop = lambda img, dy, dx: jax.lax.dynamic_slice(img, (dy, dx, 0), (h, w, img.shape[-1]))
    x_BxHxWxC = jax.vmap(crop)(padded, dy_B, dx_B)
  if flip:
    flip_B = jax.random.bernoulli(flip_key, 0.5, (b,))
    x_BxHxWxC = jnp.where(flip_B[:, None, None, None], x_BxHxWxC[:, :, ::-1], x_BxHxWxC)
  return x_BxHxWxC


def normalize(x_BxHxWxC_uint8, mean_C, std_C):
  """uint8 pixels to float32 (x/255 - mean) / std, per channel."""
  return (x_BxHxWxC_uint8.astype(jnp.float32) / 255.0 - mean_C) / std_C


def channel_stats(images_NxHxWxC):
  """(mean_C, std_C) of uint8 images in [0, 1] units, computed in float64 chunks on the host."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  n = images_NxHxWxC.shape[0]
  total, total_sq, count = 0.0, 0.0, 0
  for i in range(0, n, 4096):
    chunk = images_NxHxWxC[i:i + 4096].astype(np.float64) / 255.0
    total = total + chunk.sum(axis=(0, 1, 2))
    total_sq = total_sq + (chunk**2).sum(axis=(0, 1, 2))
    count += chunk.shape[0] * chunk.shape[1] * chunk.shape[2]
  mean = total / count
  return mean.astype(np.float32), np.sqrt(total_sq / count - mean**2).astype(np.float32)
