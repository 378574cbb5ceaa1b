"""Multi-exit CIFAR-style ResNets, MobileNet and VGG-16, and their exit heads."""
from eejax.models.heads import HEADS
from eejax.models.multi_exit import DTYPES, MultiExitNet
from eejax.models.resnet import ARCHS

__all__ = ["ARCHS", "DTYPES", "HEADS", "MultiExitNet"]
