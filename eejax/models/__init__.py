"""Multi-exit CIFAR-style ResNets, MobileNet, VGG-16 and WideResNet-32-4, and their exit heads."""
from eejax.models.heads import HEADS
from eejax.models.multi_exit import DTYPES, MultiExitNet
from eejax.models.resnet import ARCHS

__all__ = ["ARCHS", "DTYPES", "HEADS", "MultiExitNet"]
