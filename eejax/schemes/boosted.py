"""boosted: BTS-EE, branches trained one after another on a frozen backbone run; its own job (`eejax.bts`)."""
from eejax import bts
from eejax.schemes.base import Scheme, register

SCHEME = register(Scheme("boosted", job=bts.train_and_evaluate))
