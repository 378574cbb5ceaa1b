"""Multi-exit CIFAR-style ResNets and their exit heads."""
from eejax.models.heads import HEADS
from eejax.models.multi_exit import MultiExitNet
from eejax.models.resnet import ARCHS

__all__ = ["ARCHS", "HEADS", "MultiExitNet"]
