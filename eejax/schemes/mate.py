"""mate: learned ensemble teachers, one per exit (Sun et al. 2024; config.mate). The teacher weights train too."""
import jax
import numpy as np

from eejax import losses, sharding
from eejax.schemes.base import Scheme, register


def loss(b):
  return losses.mate_loss(b.logits_ExBxC, b.labels_B, b.aux["ensemble_logits_JxE"], b.weights_E,
                          temperature=b.section.temperature, primary_weight=b.section.primary_weight,
                          kd_weight=b.section.kd_weight, label_smoothing=b.label_smoothing)


def report(params) -> dict:
  """The learned teacher weights, softmax(a_j) over exits, one row per teacher."""
  return {"ensemble_weights": np.asarray(jax.nn.softmax(sharding.to_host(params["ensemble_logits"]),
                                                        axis=-1)).tolist()}


SCHEME = register(Scheme("mate", loss=loss, has_section=True, ensemble_teachers=True, report=report))
