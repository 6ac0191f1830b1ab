"""SimCLR pretraining speed on a GPU: our loop with each speed option added in turn, its model FLOPs
utilisation (MFU), and LightlySSL on the same GPU, side by side in one run.

Configs: ResNet-50 at 224 px (``r50-224``) and ResNet-18 at 32 px with the CIFAR stem (``r18-32``),
3 channels, SimCLR's heads and temperature from the paper.

- Ours: ``ssl_models.train.pretrain`` on uint8 images already on the device, augmented as whole
  batches there. Variants, each adding one option to the previous: fp32, + channels_last, + bf16
  autocast, + ``torch.compile``, + fused AdamW. Images/s is the last epoch's, after whole
  epochs of warm-up (``--warmup`` steps, rounded up to epochs of ``--steps``), which take
  compilation and cuDNN's algorithm search.
- MFU: the FLOPs of one training step (forward and backward of the loss, counted by
  ``torch.utils.flop_counter`` on the meta device, so without computing anything) times steps/s,
  over the device's peak dense bf16 FLOP/s. The same peak for every variant, fp32 included.
- LightlySSL: ``bench.lightly_peer``, per-image PIL transforms in ``--workers`` DataLoader
  workers, the same encoder, heads' sizes and augmentation strengths, trained with the last
  variant's settings (it applies channels_last and the fused optimiser; it has no bf16 or compile).

Images are uniform noise from a fixed seed: speed does not depend on what the pixels show, and
nothing here claims accuracy. Every figure is recorded with the device and the date.

    .venv/bin/python -m bench.gpu [--configs r18-32 r50-224] [--steps 20] [--warmup 10]
    .venv/bin/python -m bench.gpu --tiny --device cpu --workers 0   # seconds, what the test runs
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.lightly_peer import lightly_loader, lightly_model, lightly_throughput, lightly_transform
from ssl_models import Encoder, create_backbone, create_method
from ssl_models.augment import AugmentParams
from ssl_models.train import TrainSettings, pretrain

RESULTS = Path(__file__).parent / "results" / "gpu.json"
SEED = 0

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from NVIDIA's data sheets, by a part of
# torch.cuda.get_device_name; NVL boards run at lower clocks and are left out.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 SXM", 989e12),
    ("H100 80GB HBM3", 989e12),  # the name an H100 SXM reports
    ("H200", 989e12),
    ("A100", 312e12),
)


@dataclass(frozen=True)
class BenchConfig:
    backbone: str
    image_size: int
    batch_size: int
    aug: AugmentParams
    target: str  # what the config's target is measured on: mfu | vs_lightly


CONFIGS = {
    # SimCLR's CIFAR-10 recipe has no blur; its ImageNet one blurs half the views.
    "r18-32": BenchConfig("resnet18", 32, 512, AugmentParams(), "vs_lightly"),
    "r50-224": BenchConfig("resnet50", 224, 256, AugmentParams(blur_p=0.5), "mfu"),
}
TINY_IMAGE_SIZE = 8  # --tiny: the code paths in seconds on a CPU (bf16 is emulated on most CPUs)
TARGETS = {"mfu": 0.40, "vs_lightly": 3.0}
OPTIONS = ("precision", "channels_last", "compile", "fused_optimizer")

# Each variant adds its options to the previous one's.
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("fp32", {"precision": "fp32", "channels_last": False, "compile": False, "fused_optimizer": False}),
    ("+channels_last", {"channels_last": True}),
    ("+bf16", {"precision": "bf16"}),
    ("+compile", {"compile": True}),
    ("+fused", {"fused_optimizer": True}),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The device's peak dense bf16 FLOP/s, or None for a device not in the table (a CPU)."""
    if "NVL" in device_name:
        return None
    return next((peak for part, peak in PEAK_BF16_FLOPS if part in device_name), None)


def step_flops(model: nn.Module, view_shapes: list[tuple[int, ...]]) -> int:
    """FLOPs (2 per multiply-add) of one training step of ``model``, a module whose forward maps
    a list of views to a loss: forward and backward, counted on a copy on the meta device.

    Counts what autograd runs, so the first layer's input gradient, never computed, is not
    counted; element-wise work (normalisation, activations, the optimiser) is not counted either.
    """
    meta = copy.deepcopy(model).to("meta")
    views = [torch.empty(shape, device="meta") for shape in view_shapes]
    with FlopCounterMode(display=False) as counter:
        meta(views).backward()
    return int(counter.get_total_flops())


def mfu(flops_per_step: int, images_per_s: float, batch_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the model's FLOP/s over the device's peak (None if unknown)."""
    return None if peak is None else flops_per_step * images_per_s / batch_size / peak


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = models[0] if models else cpu
    return f"{cpu}, {torch.get_num_threads()} threads, CPU"


def synthetic_images(count: int, size: int) -> torch.Tensor:
    """uint8 noise images (count, 3, size, size), the same for every run."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, 256, (count, 3, size, size), generator=g, dtype=torch.uint8)


def encoder(cfg: BenchConfig, image_size: int) -> Encoder:
    torch.manual_seed(SEED)  # every variant and LightlySSL start from the same weights
    return Encoder(create_backbone(cfg.backbone, 3, image_size), 0.5, 0.25)


def ours(
    cfg: BenchConfig,
    settings: TrainSettings,
    images: torch.Tensor,
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict[str, float]:
    """Images/s and loss of the last of ``1 + ceil(warmup / steps)`` epochs of ``steps`` steps."""
    method = create_method("simclr", encoder(cfg, images.shape[-1]))
    epochs = 1 + math.ceil(warmup / steps)
    result = pretrain(method, images, cfg.aug, replace(settings, epochs=epochs), device=device)
    last = result.history[-1]
    return {"images_per_s": last["images_per_s"], "loss": last["loss"], "warmup_steps": (epochs - 1) * steps}


def lightly(
    cfg: BenchConfig,
    settings: TrainSettings,
    images: torch.Tensor,
    steps: int,
    warmup: int,
    workers: int,
    device: torch.device,
) -> float:
    """LightlySSL's images/s over ``steps`` steps after ``warmup``, its transforms in ``workers``."""
    model_encoder = encoder(cfg, images.shape[-1])
    model = lightly_model("simclr", model_encoder, model_encoder.num_features, {})
    transform = lightly_transform("simclr", cfg.aug, images.shape[-1])
    loader = lightly_loader(images, transform, settings.batch_size, workers, SEED, device.type == "cuda")
    return lightly_throughput(model, loader, settings, device, steps, warmup)


def skipped_variants(device: torch.device, compile_on_cpu: bool) -> dict[str, str]:
    if device.type == "cuda":
        return {}
    skipped = {"+fused": "the fused optimiser is used on a GPU only"}
    if not compile_on_cpu:
        skipped["+compile"] = (
            "torch.compile on a CPU needs a C compiler and minutes; --compile-on-cpu runs it"
        )
    return skipped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=20, help="measured training steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="steps before measuring")
    parser.add_argument("--batch-size", type=int, default=None, help="default: per config (512, 256)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="LightlySSL's loader workers"
    )
    parser.add_argument("--compile-on-cpu", action="store_true")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="batch 8, 1 step after 1 warm-up step, 8 px images: seconds on a CPU",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup = 1, 1
        args.batch_size = args.batch_size or 8
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible to PyTorch; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolutions once
    name, today = device_name(device), date.today().isoformat()
    peak = peak_bf16_flops(name)
    skipped = skipped_variants(device, args.compile_on_cpu)
    for variant, reason in skipped.items():
        print(f"skipping {variant}: {reason}", flush=True)
    configs, rows, targets = {}, [], []
    for config_name in args.configs:
        cfg = CONFIGS[config_name]
        size = TINY_IMAGE_SIZE if args.tiny else cfg.image_size
        batch = args.batch_size or cfg.batch_size
        host_images = synthetic_images(batch * args.steps, size)
        images = host_images.to(device)
        flops = step_flops(create_method("simclr", encoder(cfg, size)), [(batch, 3, size, size)] * 2)
        configs[config_name] = {
            "backbone": cfg.backbone,
            "image_size": size,
            "batch_size": batch,
            "augment": asdict(cfg.aug),
            "flops_per_step": flops,
            "flops_per_image": flops // batch,
        }
        settings = TrainSettings(batch_size=batch, warmup_epochs=0.0, seed=SEED)
        speeds: dict[str, float] = {}
        for variant, options in VARIANTS:
            if variant in skipped:
                row = {"config": config_name, "framework": "ssl-pipeline", "variant": variant}
                rows.append({**row, "skipped": skipped[variant]})
                continue
            settings = replace(settings, **options)
            measured = ours(cfg, settings, images, args.steps, args.warmup, device)
            speeds[variant] = measured["images_per_s"]
            row = {
                "config": config_name,
                "framework": "ssl-pipeline",
                "variant": variant,
                "settings": {k: getattr(settings, k) for k in OPTIONS},
                "images_per_s": round(measured["images_per_s"], 1),
                "mfu": _round(mfu(flops, measured["images_per_s"], batch, peak)),
                "loss": round(measured["loss"], 4),
                "steps": args.steps,
                "warmup_steps": measured["warmup_steps"],
                "device": name,
                "date": today,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        lightly_speed = lightly(cfg, settings, host_images, args.steps, args.warmup, args.workers, device)
        best, like_for_like = list(speeds)[-1], "+channels_last"
        rows.append(
            {
                "config": config_name,
                "framework": "lightly",
                "variant": "lightly_peer",
                "settings": {
                    **{k: getattr(settings, k) for k in OPTIONS},
                    "precision": "fp32",
                    "compile": False,
                },
                "workers": args.workers,
                "images_per_s": round(lightly_speed, 1),
                "mfu": _round(mfu(flops, lightly_speed, batch, peak)),
                "ours_vs_lightly": round(speeds[best] / lightly_speed, 2),
                "ours_fp32_channels_last_vs_lightly": round(speeds[like_for_like] / lightly_speed, 2),
                "steps": args.steps,
                "warmup_steps": args.warmup,
                "device": name,
                "date": today,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        value = mfu(flops, speeds[best], batch, peak) if cfg.target == "mfu" else speeds[best] / lightly_speed
        targets.append(
            {
                "config": config_name,
                "target": f"{cfg.target} >= {TARGETS[cfg.target]}",
                "variant": best,
                "value": _round(value),
                "met": None if value is None else value >= TARGETS[cfg.target],
                "device": name,
                "date": today,
            }
        )
        del images
    report = {
        "command": "python -m bench.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": today,
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "peak_bf16_flops": peak,
        "notes": [
            "images are synthetic uint8 noise (fixed seed): a speed measurement, no accuracy claimed",
            "MFU: flop_counter FLOPs of forward + backward per step x steps/s / peak dense bf16 FLOP/s;"
            " null when the device is not in bench.gpu.PEAK_BF16_FLOPS",
            "lightly: bench.lightly_peer with the last variant's settings; it runs fp32 without compile;"
            " its MFU uses our model's FLOPs (the same encoder, heads of the same sizes)",
            *(f"{variant} skipped: {reason}" for variant, reason in skipped.items()),
        ],
        "configs": configs,
        "rows": rows,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows, targets)
    return report


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def print_table(rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
    print("config | variant | images/s | MFU")
    for row in rows:
        speed = row.get("images_per_s", row.get("skipped"))
        print(f"{row['config']} | {row['variant']} | {speed} | {row.get('mfu')}")
    for target in targets:
        print(f"{target['config']}: {target['target']}: {target['value']} (met: {target['met']})")


if __name__ == "__main__":
    main()
