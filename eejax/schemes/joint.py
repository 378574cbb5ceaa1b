"""joint: the weighted sum of every exit's cross-entropy."""
from eejax import losses
from eejax.schemes.base import Scheme, register


def loss(b):
  total, ce_E = losses.joint_loss(b.logits_ExBxC, b.labels_B, b.weights_E, b.label_smoothing)
  return total, {"ce_E": ce_E}


SCHEME = register(Scheme("joint", loss=loss))
