import math

import numpy as np
import pytest
import torch

from ssl_models.augment import (
    AugmentParams,
    augment,
    color_jitter,
    gaussian_blur,
    random_resized_crop,
    solarize,
    to_float,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_keeps_shape_dtype_and_range(channels: int) -> None:
    x = torch.rand(16, channels, 28, 28, generator=gen())
    out = augment(x, AugmentParams(blur_p=0.5, solarize_p=0.5), gen(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_augment_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    x = torch.rand(8, 1, 28, 28, generator=gen())
    params = AugmentParams(blur_p=0.5, solarize_p=0.2)
    assert torch.equal(augment(x, params, gen(3)), augment(x, params, gen(3)))
    assert not torch.allclose(augment(x, params, gen(3)), augment(x, params, gen(4)))


def test_views_of_one_image_differ() -> None:
    x = torch.rand(1, 1, 28, 28, generator=gen()).expand(4, -1, -1, -1)
    out = augment(x, AugmentParams(), gen(5))
    assert not torch.allclose(out[0], out[1])


def test_full_crop_without_flip_is_identity() -> None:
    x = torch.rand(4, 1, 28, 28, generator=gen())
    out = random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), flip_p=0.0, g=gen())
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_full_crop_with_flip_mirrors() -> None:
    x = torch.rand(4, 1, 28, 28, generator=gen())
    out = random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), flip_p=1.0, g=gen())
    torch.testing.assert_close(out, x.flip(-1), atol=1e-5, rtol=0)


def test_crop_zooms_into_a_region() -> None:
    # The left half black, the right half white: a small crop is mostly one colour.
    x = torch.zeros(64, 1, 28, 28)
    x[..., 14:] = 1
    out = random_resized_crop(x, (0.05, 0.05), (1.0, 1.0), flip_p=0.0, g=gen())
    uniform = ((out.mean(dim=(1, 2, 3)) < 0.1) | (out.mean(dim=(1, 2, 3)) > 0.9)).float().mean()
    assert uniform > 0.5


def test_jitter_probability_zero_is_identity_and_one_changes_every_image() -> None:
    x = torch.rand(8, 1, 28, 28, generator=gen()) * 0.5 + 0.25
    torch.testing.assert_close(color_jitter(x, 0.4, 0.4, 0.0, gen()), x)
    changed = (color_jitter(x, 0.4, 0.4, 1.0, gen()) - x).abs().flatten(1).max(1).values
    assert (changed > 1e-4).all()


def test_blur_preserves_constant_images_and_smooths_noise() -> None:
    flat = torch.full((2, 1, 28, 28), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, (8.0, 16.0), 1.0, gen()), flat)
    noise = torch.rand(2, 1, 28, 28, generator=gen())
    assert gaussian_blur(noise, (8.0, 16.0), 1.0, gen()).std() < noise.std()


def test_solarize_inverts_bright_pixels() -> None:
    x = torch.tensor([0.1, 0.6, 0.9]).view(1, 1, 1, 3)
    torch.testing.assert_close(solarize(x, 1.0, gen()), torch.tensor([0.1, 0.4, 0.1]).view(1, 1, 1, 3))


def test_to_float_scales_uint8() -> None:
    out = to_float(torch.tensor([0, 255], dtype=torch.uint8))
    assert out.tolist() == [0.0, 1.0]


def photos(side: int = 64) -> torch.Tensor:
    """Real colour photographs (scikit-learn's two), resized: (2, 3, side, side) in [0, 1]."""
    from sklearn.datasets import load_sample_images

    images = torch.tensor(np.stack(load_sample_images().images)).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(to_float(images), size=(side, side), mode="area")


def hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: mean saturation, and the circular mean hue in turns, of pixels with some colour."""
    high, low = x.max(1).values, x.min(1).values
    saturation = (high - low) / high.clamp(min=1e-6)
    r, g, b = x.unbind(1)
    angle = torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b)  # hue as an angle
    weight = (high - low).flatten(1)
    mean_angle = torch.atan2(
        (weight * angle.flatten(1).sin()).sum(1), (weight * angle.flatten(1).cos()).sum(1)
    )
    return saturation.flatten(1).mean(1), mean_angle / (2 * math.pi)


def test_rgb_views_differ_in_saturation_and_hue_and_some_are_grayscale() -> None:
    x = photos().repeat(32, 1, 1, 1)  # 64 copies of the two photographs
    colour_only = dict(brightness=0.0, contrast=0.0, p=1.0)
    saturation0, hue0 = hsv(x)
    saturated = color_jitter(x, **colour_only, g=gen(0), saturation=0.2)
    saturation1, hue1 = hsv(saturated)
    assert (saturation1 / saturation0).std() > 0.05  # factors in [0.8, 1.2]
    assert (hue1 - hue0).abs().max() < 0.03  # (clipped pixels move a little)
    rotated = color_jitter(x, **colour_only, g=gen(0), hue=0.1)
    _, hue2 = hsv(rotated)
    shift = torch.remainder(hue2 - hue0 + 0.5, 1) - 0.5
    # up to a tenth of a turn of the YIQ chroma angle, which the hexcone hue follows loosely
    assert shift.abs().max() < 0.2 and shift.std() > 0.03
    gray = color_jitter(x, **colour_only, g=gen(0), grayscale_p=0.5)
    is_gray = (gray.max(1).values - gray.min(1).values).flatten(1).amax(1) < 1e-5
    assert 16 < is_gray.sum() < 48


def test_a_grayscale_batch_ignores_the_colour_settings() -> None:
    """A 1-channel batch draws no colour parameters: its views are those of brightness and contrast alone."""
    x = photos().mean(1, keepdim=True).repeat(4, 1, 1, 1)
    plain = AugmentParams(saturation=0.0, hue=0.0, grayscale_p=0.0)
    assert torch.equal(augment(x, AugmentParams(), gen(2)), augment(x, plain, gen(2)))


def test_colour_and_blur_defaults_are_byol_and_simclr_values() -> None:
    """BYOL table 6 (as MoCo v2): jitter p 0.8 of brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1;
    grayscale 0.2; SimCLR's blur sigma 0.1-2.0 px at 224 px."""
    p = AugmentParams()
    assert (p.jitter_p, p.brightness, p.contrast, p.saturation, p.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
    assert p.grayscale_p == 0.2 and p.blur_sigma == (0.1, 2.0)


def test_blur_sigma_scales_with_the_image_side() -> None:
    """blur_sigma is in pixels at 224 px: 8 px there is 1 px at 28 px."""
    x = photos(28)[:1].mean(1, keepdim=True)
    out = gaussian_blur(x, (8.0, 8.0), 1.0, gen())
    offsets = torch.arange(-2.0, 3.0)
    kernel = torch.exp(-(offsets**2) / 2)
    kernel = kernel / kernel.sum()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    expected = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 1, 5))
    expected = torch.nn.functional.conv2d(expected, kernel.view(1, 1, 5, 1))
    assert torch.allclose(out, expected, atol=1e-6)
