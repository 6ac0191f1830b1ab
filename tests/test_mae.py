"""MAE and the ViT trunk it needs: masking, the masked-patch loss, data-parallel splitting."""

import pytest
import torch
from torchvision.models.vision_transformer import VisionTransformer

from ssl_models.augment import AugmentParams, to_float
from ssl_models.backbones import Encoder, ViTTrunk, create_backbone
from ssl_models.losses import masked_patch_loss
from ssl_models.methods.mae import MAE, MAEParams, patchify

SMALL_HEADS = MAEParams(decoder_dim=32, decoder_depth=1, decoder_heads=2)


def small_mae(encoder: bool = True) -> MAE:
    """On a 2-layer 32-d ViT (patch 4, 7 x 7 grid): vit_tiny's code at a tenth of its cost."""
    torch.manual_seed(0)
    vit = VisionTransformer(28, 4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    trunk = ViTTrunk(vit, in_channels=1)
    return MAE(Encoder(trunk, 0.5, 0.25) if encoder else trunk, SMALL_HEADS).eval()


def views_of(method: MAE, images: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    return method.make_views(to_float(images), AugmentParams(), torch.Generator().manual_seed(seed))


def test_vit_trunk_matches_torchvision_forward_at_construction_size() -> None:
    torch.manual_seed(0)
    trunk = create_backbone("vit_tiny", 1, 28).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(trunk(x), trunk.vit(x))  # torchvision's forward; heads are Identity


def test_vit_trunk_takes_any_size_divisible_by_the_patch() -> None:
    trunk = create_backbone("vit_tiny", 1, 28).eval()  # patch 4: a 7 x 7 grid
    with torch.no_grad():
        assert trunk.patch_tokens(torch.rand(2, 1, 16, 12)).shape == (2, 12, 192)
        out = trunk(torch.rand(2, 1, 16, 16))
    assert out.shape == (2, 192) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not divisible by patch 4"):
        trunk(torch.rand(2, 1, 18, 18))


def test_views_are_drawn_from_the_generator(images: torch.Tensor) -> None:
    method = small_mae()
    view, noise = views_of(method, images[:4])
    assert view.shape == (4, 1, 28, 28) and noise.shape == (4, 49)
    for a, b in zip(views_of(method, images[:4]), (view, noise), strict=True):
        assert torch.equal(a, b)


def test_encoder_sees_only_the_kept_patches(images: torch.Tensor) -> None:
    method = small_mae()
    view, noise = views_of(method, images[:4])
    lengths = []
    layers = method.backbone.backbone.vit.encoder.layers
    layers.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        pred, masked = method.reconstruct(view, noise)
        loss = method.loss([view, noise])
        # Changing the pixels of masked patches changes the target but not the prediction.
        changed = view.clone()
        for i in range(view.shape[0]):
            for patch in masked[i].tolist():
                row, col = divmod(patch, 7)
                changed[i, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = torch.rand(1, 4, 4)
        changed_pred, _ = method.reconstruct(changed, noise)
        changed_loss = method.loss([changed, noise])
    keep = int(49 * (1 - 0.75))
    assert lengths[0] == 1 + keep  # the class token and the visible patches
    assert masked.shape == (4, 49 - keep)
    assert all(len(set(ids.tolist())) == 49 - keep for ids in masked)
    assert torch.equal(masked, noise.argsort(dim=1)[:, keep:])
    torch.testing.assert_close(changed_pred, pred)
    assert not torch.isclose(changed_loss, loss)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_counts_only_masked_patches(norm_pix: bool) -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(3, 49, 16, generator=g), torch.rand(3, 49, 16, generator=g)
    masked = torch.rand(3, 49, generator=g).argsort(dim=1)[:, 12:]
    visible = torch.ones(3, 49, dtype=torch.bool).scatter(1, masked, False)
    loss = masked_patch_loss(pred, target, masked, norm_pix)
    other_visible = torch.where(visible[..., None], torch.rand(3, 49, 16, generator=g), target)
    assert masked_patch_loss(pred, other_visible, masked, norm_pix) == loss
    if norm_pix:
        mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
        target = (target - mean) / std
    expected = ((pred - target) ** 2).mean(-1)[~visible].mean()
    torch.testing.assert_close(loss, expected)


def test_loss_is_deterministic_and_the_mean_of_its_halves(images: torch.Tensor) -> None:
    method = small_mae()
    views = views_of(method, images[:8])
    with torch.no_grad():
        loss = method.loss(views)
        assert torch.equal(method.loss(views), loss)
        halves = [method.loss([v[i : i + 4] for v in views]) for i in (0, 4)]
    torch.testing.assert_close(loss, (halves[0] + halves[1]) / 2)


def test_bare_trunk_and_encoder_agree_and_cnns_are_refused(images: torch.Tensor) -> None:
    method = small_mae(encoder=True)
    view, noise = views_of(method, images[:4])
    with torch.no_grad():
        pred, _ = method.reconstruct(view, noise)
        method.backbone = method.backbone.backbone  # the bare ViTTrunk, fed normalised images
        bare_pred, _ = method.reconstruct((view - 0.5) / 0.25, noise)
    torch.testing.assert_close(bare_pred, pred)
    assert patchify(view, 4).shape == (4, 49, 16)
    for backbone in (create_backbone("small_cnn"), Encoder(create_backbone("resnet18"), 0.5, 0.25)):
        with pytest.raises(TypeError, match=type(getattr(backbone, "backbone", backbone)).__name__):
            MAE(backbone, SMALL_HEADS)


def test_loss_decreases_on_a_fixed_batch(images: torch.Tensor) -> None:
    method = small_mae().train()
    views = views_of(method, images[:8])
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = method.loss(views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
