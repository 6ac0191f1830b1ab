"""Backbones and methods, parametrized over the registries: a new entry is covered by adding it."""

import pytest
import torch

from ssl_models import BACKBONES, METHODS, create_backbone, create_method
from ssl_models.augment import AugmentParams, to_float
from ssl_models.train import TrainSettings, pretrain
from tasks.config import load_config
from tests.conftest import REPO
from tests.method_fixtures import small_encoder, small_method

# On a fixed batch, DINO's centre and teacher-temperature warmup move the target on purpose
# (the loss rises as the teacher flattens); frozen here so the student's progress shows.
FIXED_TARGET = {"dino": {"teacher_temperature": 0.04, "center_momentum": 1.0}}


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("channels", [1, 3])
def test_backbone_maps_images_to_features(name: str, channels: int) -> None:
    backbone = create_backbone(name, channels, 28).eval()
    with torch.no_grad():
        out = backbone(torch.rand(2, channels, 28, 28))
    assert out.shape == (2, backbone.num_features)
    assert torch.isfinite(out).all()


def test_resnet_gets_small_image_stem_only_for_small_images() -> None:
    small = create_backbone("resnet18", 1, 28)
    large = create_backbone("resnet18", 3, 224)
    assert small.net.conv1.stride == (1, 1) and isinstance(small.net.maxpool, torch.nn.Identity)
    assert large.net.conv1.stride == (2, 2) and isinstance(large.net.maxpool, torch.nn.MaxPool2d)


TIMM_MODEL = "mobilenetv3_small_050"  # a small timm network: any timm name works the same way


@pytest.mark.parametrize("channels", [1, 3])
def test_a_timm_model_by_name_is_a_backbone(channels: int) -> None:
    backbone = create_backbone(TIMM_MODEL, channels, 28).eval()
    with torch.no_grad():
        out = backbone(torch.rand(2, channels, 28, 28))
    assert out.shape == (2, backbone.num_features)
    assert (
        load_config(REPO / "params.yaml", overrides=[f"model.backbone={TIMM_MODEL}"]).model.backbone
        == TIMM_MODEL
    )


def test_a_timm_backbone_starts_from_a_local_weights_file_adapting_its_first_layer(tmp_path) -> None:
    """A checkpoint of the 3-channel model with its 1,000-class head (as ImageNet weights come): the
    head is dropped, the stem summed to one channel (timm's adapt_input_conv), the rest loaded."""
    import timm

    torch.manual_seed(0)
    imagenet = timm.create_model(TIMM_MODEL, num_classes=1000, in_chans=3)
    torch.save(imagenet.state_dict(), tmp_path / "weights.pth")
    backbone = create_backbone(TIMM_MODEL, 1, 28, weights=str(tmp_path / "weights.pth"))
    loaded, original = backbone.net.state_dict(), imagenet.state_dict()
    stem = "conv_stem.weight"
    torch.testing.assert_close(loaded[stem], original[stem].sum(dim=1, keepdim=True))
    assert all(torch.equal(loaded[k], original[k]) for k in loaded if k != stem)
    assert "classifier.weight" in original and "classifier.weight" not in loaded


def test_unknown_backbone_and_method_are_named() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        create_backbone("vgg")
    with pytest.raises(ValueError, match="unknown method 'swav'"):
        create_method("swav", create_backbone("small_cnn"))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_loss_is_finite_and_decreases_on_a_fixed_batch(name: str, images: torch.Tensor) -> None:
    method = small_method(name, **FIXED_TARGET.get(name, {}))
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    x = to_float(images[:32])
    views = method.make_views(x, AugmentParams(), torch.Generator().manual_seed(0))
    losses = []
    for step in range(15):
        loss = method(views)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.on_step_end((step + 1) / 15)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_checkpoint_round_trip(name: str, images: torch.Tensor, tmp_path) -> None:
    method = small_method(name)
    settings = TrainSettings(epochs=1, batch_size=32, seed=1)
    pretrain(method, images, AugmentParams(), settings, checkpoint_path=tmp_path / "ckpt.pt")
    restored = small_method(name, seed=1)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    restored.load_state_dict(state["model"])
    for (key, a), b in zip(method.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_byol_target_follows_online_network_by_ema() -> None:
    method = create_method("byol", small_encoder(), {"hidden_dim": 64, "momentum_base": 0.9})
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.target_backbone.parameters()]
    method.on_step_end(0.0)  # tau = tau_base = 0.9 at the start of training
    assert method.momentum == pytest.approx(0.9)
    for old, new, online in zip(
        before, method.target_backbone.parameters(), method.backbone.parameters(), strict=True
    ):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)
    method.on_step_end(1.0)
    assert method.momentum == pytest.approx(1.0)
