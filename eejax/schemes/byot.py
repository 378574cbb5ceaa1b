"""byot: Be Your Own Teacher, every exit distils from the deepest (config.byot)."""
from eejax import losses
from eejax.schemes.base import Scheme, register


def loss(b):
  return losses.byot_loss(b.logits_ExBxC, b.labels_B, b.weights_E, temperature=b.section.temperature,
                          kd_weight=b.section.kd_weight, label_smoothing=b.label_smoothing)


SCHEME = register(Scheme("byot", loss=loss, has_section=True))
