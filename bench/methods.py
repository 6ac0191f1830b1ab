"""Every registered method on Fashion-MNIST with the same budget: kNN and linear probe at 1% and
10% of the labels, and pretraining images/s.

Budget: the default profile's pretraining (batch 256, AdamW, lr 2e-3, warmup + cosine, the
60,000 training images without labels) for ``--epochs`` epochs, small_cnn for every method but
MAE (vit_tiny, the smallest backbone it supports). Heads keep the papers' sizes except where
they are thousands of dimensions wide for a 128-d backbone (BENCH_PARAMS). Throughput is
measured separately, every method back to back on the same batches, so the images/s column
compares methods on the same machine state; ``vs_simclr`` is the ratio.

    .venv/bin/python -m bench.methods [--epochs 2] [--methods simclr dino ...]

A rerun resumes finished or interrupted pretraining from the checkpoints under workspace/pretrain/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from ssl_models import METHODS, create_method
from ssl_models.train import TrainSettings, pretrain
from tasks.config import PipelineConfig, load_config
from tasks.data import ingest_and_prepare
from tasks.evaluate import LabelBudget, evaluate_encoder
from tasks.pretrain import build_encoder, pretrain_encoder
from tasks.streaming import read_images

RESULTS = Path(__file__).parent / "results" / "methods.json"

BENCH_PARAMS: dict[str, dict[str, object]] = {
    "barlow_twins": {"projection_dim": 2048},
    "vicreg": {"projection_dim": 2048},
    "dino": {"out_dim": 4096, "hidden_dim": 1024},
    "mae": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4},
}
BACKBONE = {"mae": "vit_tiny"}
THROUGHPUT_STEPS = 12


def method_config(base: PipelineConfig, name: str, epochs: int) -> PipelineConfig:
    return load_config(
        "params.yaml",
        base.profile,
        [
            f"pretrain.method={name}",
            f"pretrain.method_params={json.dumps(BENCH_PARAMS.get(name, {}))}",
            f"pretrain.epochs={epochs}",
            f"model.backbone={BACKBONE.get(name, base.model.backbone)}",
            "evaluate.label_fractions=[0.01, 0.1]",
            "evaluate.finetune_fractions=[]",
            "evaluate.labels_per_class=[]",
            "evaluate.primary_protocol=linear",
        ],
    )


def throughput(cfg: PipelineConfig, images: torch.Tensor, mean: float, std: float) -> float:
    """Pretraining images/s over THROUGHPUT_STEPS steps after two warm-up steps."""
    method = create_method(cfg.pretrain.method, build_encoder(cfg, mean, std), cfg.pretrain.method_params)
    settings = cfg.pretrain.settings(cfg.seed)
    batch = settings.batch_size
    warm = TrainSettings(**{**settings.__dict__, "epochs": 1, "warmup_epochs": 0.0})
    pretrain(method, images[: 2 * batch], cfg.augment.params(), warm)
    result = pretrain(method, images[: THROUGHPUT_STEPS * batch], cfg.augment.params(), warm)
    return result.history[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    parser.add_argument("--profile", default="default")
    args = parser.parse_args()

    base = load_config("params.yaml", args.profile)
    data = ingest_and_prepare(base)
    unlabeled = read_images(base, data.unlabeled).images
    configs = {name: method_config(base, name, args.epochs) for name in args.methods}

    speeds = {name: throughput(cfg, unlabeled, data.mean, data.std) for name, cfg in configs.items()}
    rows = []
    for name, cfg in configs.items():
        start = time.perf_counter()
        pretrained = pretrain_encoder(cfg, data, on_epoch_end=lambda row, n=name: print(n, row, flush=True))
        pretrain_seconds = time.perf_counter() - start
        evaluation = evaluate_encoder(cfg, data, pretrained.encoder_path)
        row: dict[str, object] = {
            "method": name,
            "backbone": cfg.model.backbone,
            "method_params": cfg.pretrain.method_params,
            "final_loss": pretrained.history[-1]["loss"],
            "pretrain_seconds_this_run": round(pretrain_seconds, 1),
            "images_per_s": round(speeds[name]),
            "vs_simclr": round(speeds[name] / speeds["simclr"], 2) if "simclr" in speeds else None,
        }
        for fraction in (0.01, 0.1):
            for protocol in ("knn", "linear"):
                cell = evaluation.cell(protocol, LabelBudget(fraction=fraction))
                row[f"{protocol}_{round(fraction * 100)}pct"] = round(100 * cell.mean, 1) if cell else None
        rows.append(row)
        print(json.dumps(row), flush=True)
        RESULTS.write_text(json.dumps(report(args, base, rows), indent=2) + "\n")
    print_table(rows)


def report(
    args: argparse.Namespace, base: PipelineConfig, rows: list[dict[str, object]]
) -> dict[str, object]:
    return {
        "command": "python -m bench.methods " + " ".join(f"--epochs {args.epochs}".split()),
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "budget": {
            "epochs": args.epochs,
            "unlabeled_images": base.data.unlabeled_limit or 60000,
            "batch_size": base.pretrain.batch_size,
            "optimizer": base.pretrain.optimizer,
            "lr": base.pretrain.lr,
        },
        "rows": rows,
    }


def print_table(rows: list[dict[str, object]]) -> None:
    columns = ["method", "knn_1pct", "linear_1pct", "knn_10pct", "linear_10pct", "images_per_s", "vs_simclr"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))


if __name__ == "__main__":
    main()
