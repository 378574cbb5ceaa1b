"""sdn: SDN training (Kaya et al. 2019), every exit's cross-entropy with the internal classifiers' weights growing.

At epoch e of E (1-based), internal classifier i weighs min(C_i, w0 + e C_i / E), as in SDN's released code
(w0 = config.sdn.start_weight, 0.01), and the final exit 1. C_i is config.sdn.max_weights[i]; None gives
0.9 i / I for I internal classifiers, SDN's 0.15, 0.3, ..., 0.9 for its six.
"""
import jax.numpy as jnp

from eejax import losses
from eejax.errors import UserError
from eejax.schemes.base import Scheme, register


def max_weights(section, num_ics: int) -> tuple:
  """C_1..C_I: the configured ones, or SDN's 0.9 i / I."""
  if section.max_weights is None:
    return tuple(0.9 * (i + 1) / num_ics for i in range(num_ics))
  if len(section.max_weights) != num_ics:
    raise UserError(f"sdn.max_weights has {len(section.max_weights)} values; the model has {num_ics} internal "
                    f"classifiers (every exit but the last)")
  return tuple(float(c) for c in section.max_weights)


def weights_at(epoch, num_epochs: int, max_weights_I, start_weight: float):
  """weights_E at the 1-based `epoch`: min(C_i, w0 + epoch C_i / E) for each internal classifier, then 1."""
  c_I = jnp.asarray(max_weights_I, jnp.float32)
  ics_I = jnp.minimum(c_I, start_weight + epoch * c_I / max(num_epochs, 1))
  return jnp.concatenate([ics_I, jnp.ones(1, jnp.float32)])


def loss(b):
  num_ics = b.logits_ExBxC.shape[0] - 1
  weights_E = weights_at(b.epoch, b.num_epochs, max_weights(b.section, num_ics), b.section.start_weight)
  total, ce_E = losses.joint_loss(b.logits_ExBxC, b.labels_B, weights_E, b.label_smoothing)
  return total, {"ce_E": ce_E, "weight_E": weights_E}


SCHEME = register(Scheme("sdn", loss=loss, has_section=True))
