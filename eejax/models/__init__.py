"""Multi-exit CIFAR-style ResNets and MobileNet, and their exit heads."""
from eejax.models.heads import HEADS
from eejax.models.multi_exit import DTYPES, MultiExitNet
from eejax.models.resnet import ARCHS

__all__ = ["ARCHS", "DTYPES", "HEADS", "MultiExitNet"]
