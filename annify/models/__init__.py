"""timm model registrations the paper needs; importing this package registers them with timm.

After ``import annify.models``, ``timm.create_model("cifar_resnet_n7_c16")`` and
``timm.list_models("cifar_resnet*")`` see the paper's CIFAR ResNets.
"""

from annify.models.cifar_resnet import CifarResNet, PreActBasicBlock, cifar_resnet

__all__ = ["CifarResNet", "PreActBasicBlock", "cifar_resnet"]
