"""Models of the recipes: CIFAR Wide ResNets, small vision transformers, and any ``morph.zoo`` model.

:class:`WideResNet` is a plain ``nn.Module`` that ``torch.fx`` traces, so ``morph`` can convert,
fuse and grow it. Two BatchNorm placements:

- ``norm="preact"``: the standard pre-activation WRN (Zagoruyko & Komodakis 2016):
  BN-ReLU-conv-BN-ReLU-conv in every block.
- ``norm="block"``: BatchNorm only before each block (BN-ReLU-conv-ReLU-conv), plus the final one,
  as in the MixtureGrowth paper, which follows GradMax for a fair comparison.

:func:`vit` is timm's own ``VisionTransformer`` (class token, learned position table, pre-norm blocks,
GELU MLP), built at any size: a patch-4 ViT for 32x32 CIFAR images, or DeiT-Tiny/Small at 224x224 with
patch 16. Its baked and grown models load ``strict=True`` into the stock timm class.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import RecipeError

__all__ = ["BasicBlock", "WideResNet", "build_model", "vit", "wrn"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Pre-activation residual block of two 3x3 convolutions.

    When the shape changes, the shortcut is a strided 1x1 convolution of the pre-activated input.

    Args:
        cin: input channels.
        cout: output channels.
        stride: stride of the first convolution and the shortcut.
        inner_bn: BatchNorm between the two convolutions (``preact``); ``False`` for ``block``.
    """

    def __init__(self, cin: int, cout: int, stride: int, inner_bn: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout) if inner_bn else nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = (
            nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(o)
        out = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-d-k for 32x32 inputs: a 3x3 stem, three groups of (d-4)/6 blocks, BN-ReLU, pool, FC.

    Args:
        depth: ``d`` = 6n+4 convolutional layers (16, 22, 28, 40 ...).
        widen_factor: ``k``; group widths are 16k, 32k and 64k.
        num_classes: classifier outputs.
        norm: ``preact`` (BN in every block position) or ``block`` (BN only before each block).
        stem_channels: stem width (16 in the WRN paper).

    Weights are Kaiming-normal (fan-in), BN weight 1 and bias 0, FC bias 0.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: float = 10,
        num_classes: int = 10,
        norm: str = "block",
        stem_channels: int = 16,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise RecipeError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40 ...), got {depth}")
        if norm not in ("preact", "block"):
            raise RecipeError(f"WRN norm must be 'preact' or 'block', got {norm!r}")
        n = (depth - 4) // 6
        widths = [max(1, round(c * widen_factor)) for c in (16, 32, 64)]
        self.stem = _conv3x3(3, stem_channels)
        cin = stem_channels
        groups = []
        for width, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, width, stride if i == 0 else 1, inner_bn=norm == "preact"))
                cin = width
            groups.append(nn.Sequential(*blocks))
        self.group1, self.group2, self.group3 = groups
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group3(self.group2(self.group1(self.stem(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


def wrn(depth: int, widen_factor: float, num_classes: int = 10, norm: str = "block") -> WideResNet:
    """WRN-``depth``-``widen_factor``."""
    return WideResNet(depth=depth, widen_factor=widen_factor, num_classes=num_classes, norm=norm)


def vit(
    img_size: int = 32,
    patch_size: int = 4,
    embed_dim: int = 128,
    depth: int = 6,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    num_classes: int = 10,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """timm's ``VisionTransformer`` with a class token (``global_pool="token"``), qkv bias and timm's own
    initialization; ``embed_dim`` must split into ``num_heads`` heads."""
    from timm.models.vision_transformer import VisionTransformer

    if embed_dim % num_heads:
        raise RecipeError(f"ViT embed_dim={embed_dim} does not split into num_heads={num_heads} heads")
    if img_size % patch_size:
        raise RecipeError(f"ViT image size {img_size} is not a multiple of patch_size={patch_size}")
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                             drop_path_rate=drop_path_rate)


def build_model(cfg: ModelConfig, num_classes: int, input_size: tuple[int, int, int]) -> nn.Module:
    """The target model of a recipe, freshly initialized from the global torch RNG.

    The model is built through ``morph.build_model`` and carries morph's provenance (spec, width 1,
    input size), so ``morph.save``/``morph.load`` can rebuild it and everything made from it.

    Args:
        cfg: ``arch: wrn`` builds :class:`WideResNet` (spec ``recipes.models:wrn``), ``arch: vit`` a timm
            ``VisionTransformer`` (:func:`vit`, spec ``recipes.models:vit``) whose attention grows as
            ``model.attention`` says (recorded on the model, so every pass on it and on what is made
            from it analyzes its heads alike); any other
            ``arch`` is a ``morph.build_model`` spec (``torchvision/resnet50``, ``timm/NAME``,
            ``package.module:callable``), built without pretrained weights.
        num_classes: classifier outputs.
        input_size: ``(C, H, W)`` the model is traced and counted at.
    """
    import morph
    from morph.info import set_info
    from morph.zoo import get_spec

    if cfg.arch == "wrn":
        kwargs = {"depth": cfg.depth, "widen_factor": cfg.widen_factor, "norm": cfg.norm}
        model = morph.build_model(f"{__name__}:wrn", num_classes=num_classes, **kwargs)
    elif cfg.arch == "vit":
        kwargs = {"img_size": int(input_size[-1]), "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim,
                  "depth": cfg.depth, "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
                  "drop_path_rate": cfg.drop_path_rate}
        model = morph.build_model(f"{__name__}:vit", num_classes=num_classes, **kwargs)
    else:
        model = morph.build_model(cfg.arch, num_classes=num_classes)
    extra = {"attention_width": cfg.attention} if cfg.arch == "vit" else {}
    info = morph.MorphInfo(kind="plain", spec=get_spec(model), width=1.0, input_size=tuple(input_size), extra=extra)
    return set_info(model, info)
