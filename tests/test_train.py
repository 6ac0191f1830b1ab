import pytest
import torch

from ssl_models import Encoder, create_backbone, create_method
from ssl_models.augment import AugmentParams
from ssl_models.train import TrainSettings, load_checkpoint, pretrain, warmup_cosine


def make(name: str):
    torch.manual_seed(0)
    encoder = Encoder(create_backbone("small_cnn", 1, 28), 0.5, 0.25)
    return create_method(name, encoder, {"hidden_dim": 64} if name == "byol" else {})


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_resume_reproduces_the_uninterrupted_run(name: str, images: torch.Tensor, tmp_path) -> None:
    settings = TrainSettings(epochs=2, batch_size=16, seed=3, warmup_epochs=0.5)
    aug = AugmentParams(blur_p=0.5, solarize_p=0.2)

    whole = make(name)
    whole_result = pretrain(whole, images, aug, settings)

    ckpt = tmp_path / "ckpt.pt"
    interrupted = make(name)
    first = pretrain(interrupted, images, aug, settings, checkpoint_path=ckpt, stop_at_step=5)
    assert first.steps == 5 and load_checkpoint(ckpt)["step"] == 5
    torch.manual_seed(12345)  # the resumed process starts from other global RNG state
    resumed = make(name)
    second = pretrain(resumed, images, aug, settings, checkpoint_path=ckpt)

    assert second.resumed_from_step == 5 and second.steps == whole_result.steps == 8
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert [r["loss"] for r in second.history] == pytest.approx([r["loss"] for r in whole_result.history])


def test_checkpoint_holds_everything_needed_to_resume(images: torch.Tensor, tmp_path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    settings = TrainSettings(epochs=1, batch_size=32)
    pretrain(make("simclr"), images, AugmentParams(), settings, checkpoint_path=ckpt)
    state = load_checkpoint(ckpt)
    assert {"model", "optimizer", "scheduler", "rng", "step", "history", "settings"} <= set(state)
    assert state["step"] == 2 and state["settings"]["batch_size"] == 32


def test_completed_checkpoint_returns_without_training(images: torch.Tensor, tmp_path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    settings = TrainSettings(epochs=1, batch_size=32)
    pretrain(make("simclr"), images, AugmentParams(), settings, checkpoint_path=ckpt)
    again = pretrain(make("simclr"), images, AugmentParams(), settings, checkpoint_path=ckpt)
    assert again.resumed_from_step == again.steps == 2 and len(again.history) == 1


def test_warmup_cosine_schedule_shape() -> None:
    factor = warmup_cosine(total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0)


def test_divergence_is_reported_with_the_step(images: torch.Tensor) -> None:
    with pytest.raises(FloatingPointError, match="at step"):
        pretrain(
            make("simclr"),
            images,
            AugmentParams(),
            TrainSettings(epochs=3, batch_size=16, lr=1e12, optimizer="sgd", warmup_epochs=0),
        )
