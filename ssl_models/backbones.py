"""Backbones by name: every entry maps an image batch (N, C, H, W) to features (N, D).

Each backbone exposes ``num_features`` so heads can be sized without a dummy forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # torchvision.models imports torch._dynamo: seconds in every process that loads us
    from torchvision.models import ResNet
    from torchvision.models.vision_transformer import VisionTransformer


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-max-pool blocks (16-32-64-128 channels), fast on a CPU for 28-64 px images.

    On Fashion-MNIST, 10 SimCLR epochs of this width gave the same 1%-label linear probe as
    32-64-128-256 (79.8% vs 79.9%) at 2.6 times the images/s.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def num_features(backbone: nn.Module) -> int:
    """The width of the features a backbone (or an ``Encoder``) returns."""
    dim = getattr(backbone, "num_features", None)
    if not isinstance(dim, int):
        raise TypeError(f"{type(backbone).__name__} has no integer num_features")
    return dim


class _ResNetTrunk(nn.Module):
    """A torchvision ResNet without its classifier.

    Images of at most 64 px get the CIFAR stem (3x3 conv, stride 1, no max-pool): the
    ImageNet stem would shrink a 28 px image to 7 px before the first residual block.
    """

    def __init__(self, net: ResNet, in_channels: int, image_size: int):
        super().__init__()
        width = net.conv1.out_channels
        if image_size <= 64:
            net.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.num_features = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ViTTrunk(nn.Module):
    """torchvision's VisionTransformer returning the class token, for any channel count.

    Takes any input size divisible by the patch size (DINO's small local crops): the patch
    position embeddings are interpolated bicubically to the token grid, as in DINO's
    ``interpolate_pos_encoding``. ``patch_tokens`` and ``encode_tokens`` split the forward
    pass so MAE can drop the masked tokens in between.
    """

    def __init__(self, vit: VisionTransformer, in_channels: int):
        super().__init__()
        if in_channels != 3:
            old = vit.conv_proj
            vit.conv_proj = nn.Conv2d(
                in_channels,
                old.out_channels,
                old.kernel_size,
                old.stride,  # type: ignore[arg-type]
            )
        vit.heads = nn.Identity()
        self.vit = vit
        self.num_features = vit.hidden_dim
        self.patch_size = vit.patch_size

    def _patch_pos_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        pos = self.vit.encoder.pos_embedding[:, 1:]
        side = self.vit.image_size // self.patch_size
        if (grid_h, grid_w) == (side, side):
            return pos
        grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) to patch tokens (N, L, D) with their position embedding added."""
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by patch {self.patch_size}")
        tokens = self.vit.conv_proj(x)
        grid_h, grid_w = tokens.shape[-2:]
        return tokens.flatten(2).transpose(1, 2) + self._patch_pos_embedding(grid_h, grid_w)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (N, L, D) to encoded tokens (N, 1 + L, D), the class token first."""
        encoder = self.vit.encoder
        cls = self.vit.class_token + encoder.pos_embedding[:, :1]
        x = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return encoder.ln(encoder.layers(encoder.dropout(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens(self.patch_tokens(x))[:, 0]


def _vit(name: str, hidden_dim: int, num_heads: int) -> Callable[[int, int], nn.Module]:
    """A 12-layer ViT factory (Touvron et al. 2021 sizes): patch 4 for images <= 64 px, else 16."""

    def factory(in_channels: int, image_size: int) -> nn.Module:
        patch = 4 if image_size <= 64 else 16
        if image_size % patch:
            raise ValueError(f"{name} needs image_size divisible by {patch}, got {image_size}")
        from torchvision.models.vision_transformer import VisionTransformer

        vit = VisionTransformer(
            image_size=image_size,
            patch_size=patch,
            num_layers=12,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            mlp_dim=4 * hidden_dim,
        )
        return ViTTrunk(vit, in_channels)

    return factory


_vit_tiny = _vit("vit_tiny", hidden_dim=192, num_heads=3)
_vit_small = _vit("vit_small", hidden_dim=384, num_heads=6)


def _resnet(name: str) -> Callable[[int, int], nn.Module]:
    def factory(in_channels: int, image_size: int) -> nn.Module:
        from torchvision import models

        return _ResNetTrunk(getattr(models, name)(), in_channels, image_size)

    return factory


BACKBONES: dict[str, Callable[[int, int], nn.Module]] = {
    "small_cnn": lambda in_channels, image_size: SmallCNN(in_channels),
    # A quarter of small_cnn's parameters: the distillation student.
    "tiny_cnn": lambda in_channels, image_size: SmallCNN(in_channels, (8, 16, 32, 64)),
    "resnet18": _resnet("resnet18"),
    "resnet50": _resnet("resnet50"),
    "vit_tiny": _vit_tiny,
    "vit_small": _vit_small,
}


def is_timm_model(name: str) -> bool:
    """A model name of timm (``timm.list_models()``), when timm is installed."""
    try:
        import timm
    except ImportError:
        return False
    return name in timm.list_models()


def _timm(name: str, in_channels: int, image_size: int, weights: str | None) -> nn.Module:
    """A timm model without its classifier (``num_classes=0``: pooled features). With ``weights``
    (a local file, e.g. ImageNet weights a user has) timm loads them as its pretrained weights,
    dropping the classifier and adapting the first layer to ``in_channels``; nothing is downloaded."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": in_channels}
    if weights:
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": weights}}
    try:
        model = timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError:  # no img_size argument: a convolutional network, any size
        model = timm.create_model(name, **kwargs)
    return TimmTrunk(model)


class TimmTrunk(nn.Module):
    """A timm model without its classifier; ``num_features`` is the width it returns (a model with
    a pre-logits layer, such as MobileNetV3's, returns that layer's width, not ``num_features``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        width: Any = getattr(net, "head_hidden_size", None) or net.num_features
        self.num_features = int(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def create_backbone(
    name: str, in_channels: int = 1, image_size: int = 28, weights: str | None = None
) -> nn.Module:
    """Build a backbone, one of ``BACKBONES`` or any timm model by name: randomly initialised, or
    from ``weights`` (a local state-dict file of the backbone; for timm, its own checkpoint format).
    Weights are never downloaded."""
    if name in BACKBONES:
        backbone = BACKBONES[name](in_channels, image_size)
        if weights:
            backbone.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return backbone
    if is_timm_model(name):
        return _timm(name, in_channels, image_size, weights)
    raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or a timm model name")


class Encoder(nn.Module):
    """A backbone behind input normalisation: takes float images in [0, 1]."""

    def __init__(self, backbone: nn.Module, mean: float, std: float):
        super().__init__()
        self.backbone = backbone
        self.num_features = num_features(backbone)
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)
