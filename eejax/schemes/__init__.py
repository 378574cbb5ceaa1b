"""Training schemes, one module each, registered by name: joint, erde, mate, byot, boosted (BTS-EE's job), sdn and
ic_only (SDN's two)."""
from eejax.schemes import boosted, byot, erde, ic_only, joint, mate, sdn  # pylint: disable=unused-import  # they register
from eejax.schemes.base import SCHEMES, LossInputs, Scheme, Teacher, get, register

__all__ = ["SCHEMES", "LossInputs", "Scheme", "Teacher", "get", "register"]
