"""The GPU path: the loop's speed options (bf16, compile, fused optimiser, losses read once per
epoch) and bench.gpu's FLOP count and MFU, all checked on a CPU."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.gpu import main, mfu, peak_bf16_flops, step_flops
from ssl_models import Encoder, create_backbone, create_method
from ssl_models.augment import AugmentParams
from ssl_models.methods.simclr import SimCLR, SimCLRParams
from ssl_models.train import TrainSettings, build_optimizer, load_checkpoint, pretrain


def simclr() -> nn.Module:
    torch.manual_seed(0)
    return create_method("simclr", Encoder(create_backbone("small_cnn", 1, 28), 0.5, 0.25))


class RecordingSimCLR(SimCLR):
    """SimCLR that records every step's loss, and can make one step's loss NaN."""

    def __init__(self, nan_at_call: int | None = None):
        torch.manual_seed(0)
        super().__init__(Encoder(create_backbone("small_cnn", 1, 28), 0.5, 0.25), SimCLRParams())
        self.losses: list[float] = []
        self.nan_at_call = nan_at_call

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        loss = super().loss(views)
        if len(self.losses) == self.nan_at_call:
            loss = loss * float("nan")
        self.losses.append(loss.item())
        return loss


def test_epoch_loss_is_the_mean_of_the_step_losses_read_at_the_epoch_end(images: torch.Tensor) -> None:
    method = RecordingSimCLR()
    settings = TrainSettings(epochs=2, batch_size=16, checkpoint_every_steps=3)
    history = pretrain(method, images, AugmentParams(), settings, on_checkpoint=lambda state: None).history
    assert [row["loss"] for row in history] == [sum(method.losses[:4]) / 4, sum(method.losses[4:]) / 4]


def test_a_non_finite_loss_is_reported_with_its_step(images: torch.Tensor) -> None:
    saved: list[int] = []
    with pytest.raises(FloatingPointError, match="loss is nan at step 2;"):
        pretrain(
            RecordingSimCLR(nan_at_call=2),
            images,
            AugmentParams(),
            TrainSettings(epochs=2, batch_size=16),
            on_checkpoint=lambda state: saved.append(state["step"]),
        )
    assert saved == []  # found before the end of the first epoch's checkpoint


def test_bf16_trains_close_to_fp32(images: torch.Tensor) -> None:
    losses = {}
    for precision in ("fp32", "bf16"):
        settings = TrainSettings(epochs=2, batch_size=16, precision=precision)
        losses[precision] = [
            row["loss"] for row in pretrain(simclr(), images, AugmentParams(), settings).history
        ]
    assert losses["bf16"] != losses["fp32"]  # autocast did run
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; choose one of \['fp32', 'bf16'\]"):
        TrainSettings(precision="fp16")


def test_compiled_loop_trains_the_same_and_checkpoints_the_methods_keys(
    images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aot_eager runs Dynamo and AOTAutograd as torch.compile does, without generating C++ code.
    compiled: list[nn.Module] = []
    real_compile = torch.compile

    def compile_without_codegen(model: nn.Module) -> nn.Module:
        compiled.append(model)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_without_codegen)
    settings = TrainSettings(epochs=2, batch_size=16, seed=3)
    eager = pretrain(simclr(), images, AugmentParams(), settings, checkpoint_path=tmp_path / "eager.pt")
    assert compiled == []
    method = simclr()
    ckpt = tmp_path / "compiled.pt"
    compiled_settings = replace(settings, compile=True)
    first = pretrain(method, images, AugmentParams(), compiled_settings, checkpoint_path=ckpt, stop_at_step=4)
    assert compiled == [method] and first.steps == 4
    assert list(load_checkpoint(ckpt)["model"]) == list(load_checkpoint(tmp_path / "eager.pt")["model"])
    resumed = pretrain(simclr(), images, AugmentParams(), settings, checkpoint_path=ckpt)
    assert resumed.resumed_from_step == 4
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in eager.history])


def test_the_fused_optimizer_is_chosen_on_a_gpu_only() -> None:
    model = nn.Linear(4, 2)
    assert build_optimizer(model, TrainSettings()).param_groups[0]["fused"] is None
    if torch.cuda.is_available():
        model.cuda()
        assert build_optimizer(model, TrainSettings()).param_groups[0]["fused"] is True
        assert build_optimizer(model, TrainSettings(fused_optimizer=False)).param_groups[0]["fused"] is None


class LossOf(nn.Module):
    """A network as a 'method': the sum of its outputs over the views is the loss."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.net(v).sum() for v in views]).sum()


def test_step_flops_match_the_analytic_count() -> None:
    batch, d_in, d_hidden, d_out = 16, 8, 32, 4
    mlp = LossOf(nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out)))
    # Forward 2 * B * (in*hidden + hidden*out); backward: both weight gradients and the second
    # layer's input gradient; the first layer's input gradient is never computed.
    forward = 2 * batch * (d_in * d_hidden + d_hidden * d_out)
    backward = 2 * batch * (d_in * d_hidden + 2 * d_hidden * d_out)
    assert step_flops(mlp, [(batch, d_in)]) == forward + backward

    conv = LossOf(nn.Conv2d(3, 8, 3, padding=1))
    conv_forward = 2 * 2 * 8 * 10 * 10 * 3 * 3 * 3  # 2 * N * C_out * H * W * C_in * k * k
    assert step_flops(conv, [(2, 3, 10, 10)] * 2) == 2 * 2 * conv_forward  # two views, forward + weight grad


def test_resnet50_forward_flops_match_torchvision() -> None:
    # torchvision lists ResNet-50 at 224 px as 4.09 GFLOPS, counting one per multiply-add.
    counted = step_flops(LossOf(create_backbone("resnet50", 3, 224)), [(1, 3, 224, 224)])
    first_conv_input_grad = 2 * 64 * 112 * 112 * 3 * 7 * 7  # never computed, so not counted
    assert (counted + first_conv_input_grad) / 3 == pytest.approx(2 * 4.09e9, rel=0.01)


def test_mfu_and_peak_flops() -> None:
    assert mfu(flops_per_step=10**12, images_per_s=512.0, batch_size=256, peak=4e12) == pytest.approx(0.5)
    assert mfu(10**12, 512.0, 256, None) is None
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA H100 NVL") is None
    assert peak_bf16_flops("AMD EPYC, 2 threads, CPU") is None


def test_tiny_cpu_run_writes_every_figure_with_device_and_date(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    main(["--tiny", "--device", "cpu", "--workers", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    assert {"command", "date", "device", "notes", "configs", "rows", "targets"} <= set(report)
    assert set(report["configs"]) == {"r18-32", "r50-224"}
    assert all(c["flops_per_step"] > 0 for c in report["configs"].values())
    for config in ("r18-32", "r50-224"):
        rows = {row["variant"]: row for row in report["rows"] if row["config"] == config}
        assert list(rows) == ["fp32", "+channels_last", "+bf16", "+compile", "+fused", "lightly_peer"]
        assert "skipped" in rows["+compile"] and "skipped" in rows["+fused"]  # CPU: not run by default
        assert rows["+bf16"]["settings"] == {
            "precision": "bf16",
            "channels_last": True,
            "compile": False,
            "fused_optimizer": False,
        }
        for row in (rows["fp32"], rows["+channels_last"], rows["+bf16"], rows["lightly_peer"]):
            assert row["images_per_s"] > 0 and row["mfu"] is None  # no peak FLOP/s for a CPU
            assert (row["device"], row["date"]) == (report["device"], report["date"])
    targets = {t["config"]: t for t in report["targets"]}
    assert targets["r50-224"]["met"] is None  # MFU is unknown on a CPU
    assert isinstance(targets["r18-32"]["met"], bool) and targets["r18-32"]["variant"] == "+bf16"
