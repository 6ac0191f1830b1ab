"""Batched image augmentations that run on tensors, on the training device.

Every random draw comes from an explicit ``torch.Generator`` on the CPU (parameters are a
few numbers per image), so a batch is augmented identically on CPU and GPU for the same
seed, and no per-image Python work sits in the hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    """Strengths of the SimCLR-style view pipeline (Chen et al. 2020, appendix A), colour jitter and
    grayscale as BYOL's table 6 (and MoCo v2's): brightness, contrast 0.4, saturation 0.2, hue 0.1
    with probability 0.8, grayscale 0.2. Saturation, hue and grayscale act on RGB images only.

    ``blur_sigma`` is in pixels at 224 px and scales with the image (SimCLR's 0.1-2.0 at 224 px is
    0.0125-0.25 px at 28 px): a blur tuned for ImageNet does not erase a small image.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


BLUR_SIGMA_SIDE = 224  # the image side at which ``blur_sigma`` is in pixels
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as torchvision's rgb_to_grayscale
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
_GRAY = torch.tensor(LUMA).expand(3, 3)  # each row: the luma weights
_EYE = torch.eye(3)


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _bernoulli(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def random_resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_p: float,
    g: torch.Generator,
    size: int | None = None,
) -> torch.Tensor:
    """Crop a random area fraction and aspect ratio per image, flip, resize to ``size``.

    One affine ``grid_sample`` call for the whole batch: crop, flip and resize together.
    """
    n = x.shape[0]
    area = _uniform(n, *scale, g)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (torch.rand(n, generator=g) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(n, generator=g) * 2 - 1) * (1 - height)
    flip = torch.where(_bernoulli(n, flip_p, g), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    out_size = size or x.shape[-1]
    grid = F.affine_grid(
        theta.to(x.device, x.dtype), [n, x.shape[1], out_size, out_size], align_corners=False
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(
    x: torch.Tensor,
    brightness: float,
    contrast: float,
    p: float,
    g: torch.Generator,
    saturation: float = 0.0,
    hue: float = 0.0,
    grayscale_p: float = 0.0,
) -> torch.Tensor:
    """Scale brightness and contrast by random factors, per image, with probability ``p``; on RGB
    images then saturation and hue too (with the same ``p``), and grayscale with ``grayscale_p``.

    Saturation (a blend with the image's luma), a hue rotation (of the YIQ chroma plane, by up to
    ``hue`` of a turn, as NVIDIA DALI's ``hue``) and grayscale are each a 3 x 3 colour matrix per
    image, so an RGB batch takes one ``einsum``. A 1-channel batch draws no colour parameters.
    """
    n = x.shape[0]
    apply = _bernoulli(n, p, g)
    b = torch.where(apply, _uniform(n, 1 - brightness, 1 + brightness, g), 1.0)
    c = torch.where(apply, _uniform(n, 1 - contrast, 1 + contrast, g), 1.0)
    b, c = (t.to(x.device, x.dtype).view(n, 1, 1, 1) for t in (b, c))
    x = x * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    if x.shape[1] != 3:
        return x
    s = torch.where(apply, _uniform(n, max(0.0, 1 - saturation), 1 + saturation, g), 1.0)
    turn = torch.where(apply, _uniform(n, -hue, hue, g), 0.0) * 2 * math.pi
    gray = _bernoulli(n, grayscale_p, g)
    saturate = s.view(n, 1, 1) * _EYE + (1 - s).view(n, 1, 1) * _GRAY
    rotate = torch.zeros(n, 3, 3)
    rotate[:, 0, 0] = 1
    rotate[:, 1, 1], rotate[:, 1, 2] = torch.cos(turn), -torch.sin(turn)
    rotate[:, 2, 1], rotate[:, 2, 2] = torch.sin(turn), torch.cos(turn)
    hue_shift = _YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ
    matrix = torch.where(gray.view(n, 1, 1), _GRAY, _EYE) @ hue_shift @ saturate
    return torch.einsum("nij,njhw->nihw", matrix.to(x.device, x.dtype), x).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: tuple[float, float], p: float, g: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur with a random sigma per image (in pixels at 224 px, scaled to the
    image's side), applied with probability ``p``; the kernel spans a tenth of the side (SimCLR)."""
    n, c, h, w = x.shape
    apply = _bernoulli(n, p, g)
    sigmas = _uniform(n, *sigma, g) * min(h, w) / BLUR_SIGMA_SIDE
    if not apply.any():
        return x
    radius = max(1, min(h, w) // 10)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigmas[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).float().expand(n, -1)
    kernel = torch.where(apply[:, None], kernel, identity)
    kernel = kernel.repeat_interleave(c, dim=0).to(x.device, x.dtype)
    flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def solarize(x: torch.Tensor, p: float, g: torch.Generator, threshold: float = 0.5) -> torch.Tensor:
    """Invert pixels above ``threshold``, per image with probability ``p`` (BYOL, table 6)."""
    apply = _bernoulli(x.shape[0], p, g).to(x.device).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1 - x, x)


def augment(
    x: torch.Tensor, params: AugmentParams, g: torch.Generator, size: int | None = None
) -> torch.Tensor:
    """One random view of each image in a float batch in [0, 1], (N, C, H, W), resized to ``size``."""
    x = random_resized_crop(x, params.crop_scale, params.crop_ratio, params.flip_p, g, size)
    x = color_jitter(
        x,
        params.brightness,
        params.contrast,
        params.jitter_p,
        g,
        params.saturation,
        params.hue,
        params.grayscale_p,
    )
    if params.blur_p > 0:
        x = gaussian_blur(x, params.blur_sigma, params.blur_p, g)
    if params.solarize_p > 0:
        x = solarize(x, params.solarize_p, g)
    return x


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) to float in [0, 1]."""
    return images.float().div_(255)
