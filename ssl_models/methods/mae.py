"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Mask a random 75% of the patches, encode only the visible ones, and let a light decoder
reconstruct the pixels of the rest. Section 3: "Our loss function computes the mean squared
error (MSE) between the reconstructed and original images in the pixel space. We compute the
loss only on masked patches, similar to BERT." With ``norm_pix_loss`` the targets are "the
normalized pixel values of each masked patch": each patch minus its mean, over its standard
deviation (section 3, table 1d).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ssl_models.augment import AugmentParams, augment
from ssl_models.backbones import Encoder, ViTTrunk
from ssl_models.losses import masked_patch_loss
from ssl_models.methods.base import SSLMethod


@dataclass(frozen=True)
class MAEParams:
    """Defaults from the paper: mask 75% (fig. 5), an 8-block 512-d decoder (table 1a-b) with
    16 heads (the reference code), normalised-pixel targets (table 1d)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images (N, C, H, W) to patches (N, L, p * p * C), in the ViT's row-major token order."""
    n, c, h, w = images.shape
    p = patch_size
    patches = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(n, (h // p) * (w // p), p * p * c)


def sincos_pos_embedding(grid_h: int, grid_w: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding (L, dim): half the channels for the row, half the column."""
    if dim % 4:
        raise ValueError(f"the 2D sine-cosine embedding needs a dimension divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32, device=device) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float32, device=device),
        torch.arange(grid_w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    angles = [axis.reshape(-1, 1) * omega for axis in (rows, cols)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


def vit_trunk(backbone: nn.Module) -> ViTTrunk:
    """The ViT inside ``backbone`` (a ``ViTTrunk`` or an ``Encoder`` around one)."""
    inner = backbone.backbone if isinstance(backbone, Encoder) else backbone
    if not isinstance(inner, ViTTrunk):
        raise TypeError(
            f"MAE needs a ViT backbone ({' or '.join(MAE.backbones)}), got {type(inner).__name__}"
        )
    return inner


class MAE(SSLMethod):
    name = "mae"
    Params = MAEParams
    backbones = ("vit_tiny", "vit_small")

    def __init__(self, backbone: nn.Module, params: MAEParams):
        from torchvision.models.vision_transformer import EncoderBlock  # see ssl_models.backbones

        super().__init__(backbone, params)
        trunk = vit_trunk(backbone)
        dim = params.decoder_dim
        self.decoder_embed = nn.Linear(trunk.num_features, dim)
        self.mask_token = nn.Parameter(torch.empty(1, 1, dim).normal_(std=0.02))
        self.decoder_blocks = nn.Sequential(
            *(
                EncoderBlock(
                    params.decoder_heads,
                    dim,
                    mlp_dim=4 * dim,
                    dropout=0.0,
                    attention_dropout=0.0,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                )
                for _ in range(params.decoder_depth)
            )
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        channels = trunk.vit.conv_proj.in_channels
        self.decoder_pred = nn.Linear(dim, trunk.patch_size**2 * channels)
        for linear in (self.decoder_embed, self.decoder_pred):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def make_views(self, images: torch.Tensor, aug: AugmentParams, g: torch.Generator) -> list[torch.Tensor]:
        """One randomly resized, cropped and flipped view (table 1e) and its mask noise (N, L)."""
        crop_only = dataclasses.replace(aug, jitter_p=0.0, blur_p=0.0, solarize_p=0.0)
        view = augment(images, crop_only, g)
        p = vit_trunk(self.backbone).patch_size
        num_patches = (view.shape[-2] // p) * (view.shape[-1] // p)
        noise = torch.rand(view.shape[0], num_patches, generator=g).to(images.device)
        return [view, noise]

    def reconstruct(self, view: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted patches (N, L, p * p * C) and the ids of the masked ones (N, M).

        Random masking as in the reference code: the patches with the smallest noise stay
        visible, and only those go through the encoder.
        """
        trunk = vit_trunk(self.backbone)
        x = view
        if isinstance(self.backbone, Encoder):
            x = (view - self.backbone.mean) / self.backbone.std
        tokens = trunk.patch_tokens(x)
        n, num_patches, width = tokens.shape
        keep = int(num_patches * (1 - self.params.mask_ratio))
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        visible = tokens.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, width))
        latent = self.decoder_embed(trunk.encode_tokens(visible))
        dim = latent.shape[-1]
        mask_tokens = self.mask_token.expand(n, num_patches - keep, -1)
        patches = torch.cat([latent[:, 1:], mask_tokens], dim=1)
        patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, dim))
        grid_h, grid_w = view.shape[-2] // trunk.patch_size, view.shape[-1] // trunk.patch_size
        # Fixed 2D sine-cosine positions as in the paper (zero for the class token): they
        # need no parameters and work for any token grid.
        pos = sincos_pos_embedding(grid_h, grid_w, dim, view.device)
        decoded = torch.cat([latent[:, :1], patches + pos], dim=1)
        decoded = self.decoder_norm(self.decoder_blocks(decoded))
        return self.decoder_pred(decoded[:, 1:]), ids_shuffle[:, keep:]

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        view, noise = views
        pred, masked = self.reconstruct(view, noise)
        target = patchify(view, vit_trunk(self.backbone).patch_size)
        return masked_patch_loss(pred, target, masked, self.params.norm_pix_loss)
