"""The paper's CIFAR ResNets (pre-activation, He et al. 2016), registered in timm's model registry.

AdaLoss (Hu et al., AAAI 2019), appendix B, builds its CIFAR/SVHN ResANNs on the classic three-stage CIFAR
ResNet: a 3x3 stem conv to ``c`` channels, then three stages of ``n`` pre-activation basic units with ``c``,
``2c`` and ``4c`` channels (stride 2 at the first unit of stages 2 and 3), then BN-ReLU, global average pooling
and a linear classifier. The network has ``6n + 2`` weight layers (n=3 is ResNet-20).

Importing this module registers ``cifar_resnet_n{n}_c{c}`` for the paper's twelve ``(n, c)`` pairs,
``{7, 9, 13, 17, 25} x {16, 32}`` plus ``(9, 64)`` and ``(9, 128)``, and small variants that are *not* from
the paper: ``cifar_resnet_n3_c8`` and ``cifar_resnet_n5_c16`` for CPU tests and the 8x8 digits demo,
``cifar_resnet_n{2,4,8}_c16`` for a digits EANN whose members double in depth, and
``cifar_resnet_n3_c16`` for the Fashion-MNIST reproduction on a 2-core CPU.
Any other ``(n, c)`` is available through :func:`cifar_resnet`.

Module layout, chosen so a graph tool finds the repeated units and so it reads like timm's ``ResNet``::

    stem                  Conv2d(in_chans, c, 3x3)
    stages.{i}.{j}        PreActBasicBlock, i in 0..2 (stage), j in 0..n-1 (unit)
    norm, act             final BN-ReLU
    global_pool           timm SelectAdaptivePool2d (avg, flattened)
    fc                    Linear(4c, num_classes), the classifier (``get_classifier()``)

ReLUs are not in-place: heads attached to an intermediate tensor must not see it overwritten later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, is_model, register_model
from torch import nn

__all__ = ["CifarResNet", "PreActBasicBlock", "cifar_resnet"]

PAPER_CONFIGS: tuple[tuple[int, int], ...] = (
    *((n, c) for n in (7, 9, 13, 17, 25) for c in (16, 32)),
    (9, 64),
    (9, 128),
)
"""The ``(n, c)`` pairs of the paper's CIFAR ResANNs (units per stage, channels of the first stage)."""

TINY_CONFIGS: tuple[tuple[int, int], ...] = ((3, 8), (3, 16), (5, 16), (2, 16), (4, 16), (8, 16))
"""Small ``(n, c)`` pairs for CPU tests and the digits demo; not from the paper."""

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic residual unit: BN-ReLU, 3x3 conv, BN-ReLU, 3x3 conv, plus shortcut.

    The shortcut is the raw input when shape is kept, otherwise a strided 1x1 conv of the *pre-activated*
    input, as in He et al.'s pre-activation ResNets. The unit's output is not activated; the next unit (or the
    model's final ``norm``/``act``) does that.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first 3x3 conv and of the projection shortcut.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.BatchNorm2d(in_chs, **dd)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.norm2 = nn.BatchNorm2d(out_chs, **dd)
        self.act2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False, **dd)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.act1(self.norm1(x))
        # `downsample` is fixed at construction, so this branch is resolved once when FX traces the unit.
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        out = self.conv1(x_preact)
        out = self.conv2(self.act2(self.norm2(out)))
        return out + shortcut


class CifarResNet(nn.Module):
    """Three-stage pre-activation CIFAR ResNet with ``n`` basic units per stage.

    Spatial size halves at stages 2 and 3 only, so 32x32 inputs end at 8x8 and 8x8 inputs at 2x2.

    Args:
        n: Residual units per stage (depth ``6n + 2``).
        c: Channels of the stem and first stage; stages have ``c``, ``2c``, ``4c``.
        num_classes: Classifier outputs; 0 replaces ``fc`` by an identity (features only).
        in_chans: Input image channels.
        global_pool: timm pooling type for the head (``'avg'``; ``''`` keeps the spatial map).
        drop_rate: Dropout before ``fc`` (timm's train script passes it).
    """

    def __init__(
        self,
        n: int = 3,
        c: int = 16,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if n < 1 or c < 1:
            raise ValueError(f"CifarResNet needs n >= 1 and c >= 1, got n={n}, c={c}")
        dd = {"device": device, "dtype": dtype}
        self.n, self.c = n, c
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = nn.Conv2d(in_chans, c, 3, stride=1, padding=1, bias=False, **dd)
        stages, self.feature_info = [], []
        in_chs = c
        for i, (out_chs, stride) in enumerate(((c, 1), (2 * c, 2), (4 * c, 2))):
            units = [PreActBasicBlock(in_chs, out_chs, stride, **dd)]
            units += [PreActBasicBlock(out_chs, out_chs, 1, **dd) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            self.feature_info.append(dict(num_chs=out_chs, reduction=2**i, module=f"stages.{i}"))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = in_chs
        self.norm = nn.BatchNorm2d(in_chs, **dd)
        self.act = nn.ReLU()
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool, **dd)
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming-normal (fan_out, as fb.resnet.torch and timm) for convs, identity BN; `fc` keeps torch's init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters by stem / stage / unit, for layer-wise LR decay."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each unit's activations in backward (timm ``checkpoint_seq``) to save memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> str | nn.Module:
        """The final linear classifier ``fc`` (or its name)."""
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace pooling and ``fc`` for ``num_classes`` outputs (0: no classifier); keeps pooling if None."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        dd = {"device": self.stem.weight.device, "dtype": self.stem.weight.dtype}
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **dd
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, the three stages and the final BN-ReLU: (B, in_chans, H, W) -> (B, 4c, H/4, W/4)."""
        x = self.stem(x)
        # The flag is a Python bool, so FX traces the plain branch (checkpointing is off by default).
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return self.act(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pooling, optional dropout and ``fc``; ``pre_logits`` stops before ``fc``."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # No weights are published: `url` is empty, so `pretrained=True` raises timm's "No pretrained weights".
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "stem",
        "classifier": "fc",
        **kwargs,
    }


def _name(n: int, c: int) -> str:
    return f"cifar_resnet_n{n}_c{c}"


default_cfgs = generate_default_cfgs(
    {
        **{_name(n, c): _cfg(paper_ids=("arXiv:1708.06832", "arXiv:1603.05027")) for n, c in PAPER_CONFIGS},
        **{
            _name(n, c): _cfg(notes=("Small variant for tests and demos; not from the paper.",))
            for n, c in TINY_CONFIGS
        },
    }
)


def cifar_resnet(n: int, c: int, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """Build a CIFAR ResNet with any ``n`` and ``c`` through timm's builder (``features_only`` etc. work).

    Registered sizes use their registry cfg; other sizes get the same CIFAR cfg under the name
    ``cifar_resnet_n{n}_c{c}``, which is not added to the registry.

    Args:
        n: Residual units per stage.
        c: Channels of the first stage.
        pretrained: Kept for timm's entrypoint signature; True raises, as no weights are published.
        **kwargs: Passed to :class:`CifarResNet` (``num_classes``, ``in_chans``, ...) and timm's builder.
    """
    variant = _name(n, c)
    if not is_model(variant) and not kwargs.get("pretrained_cfg"):
        kwargs["pretrained_cfg"] = _cfg()
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2), flatten_sequential=True),
        n=n,
        c=c,
        **kwargs,
    )


def _entrypoint(n: int, c: int) -> Callable[..., CifarResNet]:
    # timm registers an entrypoint under `fn.__name__` and reads `default_cfgs` of `fn.__module__`,
    # so a renamed closure defined here is as good as a hand-written function.
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
        return cifar_resnet(n, c, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = _name(n, c)
    entrypoint.__doc__ = f"CIFAR pre-activation ResNet, n={n} units per stage, c={c} (depth {6 * n + 2})."
    return entrypoint


for _n, _c in PAPER_CONFIGS + TINY_CONFIGS:
    globals()[_name(_n, _c)] = register_model(_entrypoint(_n, _c))
del _n, _c
