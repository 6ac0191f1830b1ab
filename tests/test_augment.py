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
    torch.testing.assert_close(gaussian_blur(flat, (1.0, 2.0), 1.0, gen()), flat)
    noise = torch.rand(2, 1, 28, 28, generator=gen())
    assert gaussian_blur(noise, (1.0, 2.0), 1.0, gen()).std() < noise.std()


def test_solarize_inverts_bright_pixels() -> None:
    x = torch.tensor([0.1, 0.6, 0.9]).view(1, 1, 1, 3)
    torch.testing.assert_close(solarize(x, 1.0, gen()), torch.tensor([0.1, 0.4, 0.1]).view(1, 1, 1, 3))


def test_to_float_scales_uint8() -> None:
    out = to_float(torch.tensor([0, 255], dtype=torch.uint8))
    assert out.tolist() == [0.0, 1.0]
