"""Data parallelism with `jax.sharding`: batch sharded, everything else replicated.

One program serves one CPU, 8 GPUs or a TPU slice: the mesh has one axis,
'data', over every device of every process. Under jit, BatchNorm statistics
and the loss are computed over the global batch, so the maths does not depend
on the device count.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eejax.errors import UserError


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "train.batch_size") -> None:
  if batch_size % mesh.size:
    raise UserError(f"{name}={batch_size} must be a multiple of the number of devices ({mesh.size})")


def put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array (the same on every process) as a global array laid out by `sharding`."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_replicated(x: np.ndarray, mesh: Mesh) -> jax.Array:
  return put(x, replicated(mesh))


def to_host(tree):
  """Replicated (or fully addressable) device arrays to numpy, on every process."""
  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(a.addressable_data(0))
    return np.asarray(a)
  return jax.tree.map(get, tree)
