"""Pretraining on Ray Train vs the bare ``ssl_models`` loop: same steps, side by side in one run.

Variants, each training the default profile's SimCLR / small_cnn (batch 256) for the same
steps from scratch on the same images:
  - ``bare``: ``ssl_models.train.pretrain`` in this process (PyTorch's threads on every core);
  - ``ray_1x2``: Ray Train, 1 worker holding both CPUs (the default on this machine);
  - ``ray_2x1``: Ray Train, 2 DDP workers (gloo, synchronised BatchNorm) of 1 CPU each.

For each: wall time (the Ray variants include starting the worker group, resuming logic and
checkpoint hand-off; ``ray.init`` is timed apart), steady images/s (epochs after the first),
and the ratio to ``bare``.

    .venv/bin/python -m bench.ray_pretrain [--images 25600] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from ssl_models import create_method
from ssl_models.train import pretrain
from tasks.config import PipelineConfig, load_config
from tasks.data import PreparedData, ingest_and_prepare
from tasks.pretrain import build_encoder, connect, pretrain_encoder
from tasks.streaming import read_images

RESULTS = Path(__file__).parent / "results" / "ray_pretrain.json"


def bare(cfg: PipelineConfig, data: PreparedData) -> tuple[float, list[dict[str, float]]]:
    start = time.perf_counter()
    method = create_method(
        cfg.pretrain.method, build_encoder(cfg, data.mean, data.std), cfg.pretrain.method_params
    )
    history = pretrain(
        method, read_images(cfg, data.unlabeled).images, cfg.augment.params(), cfg.pretrain.settings(0)
    )
    return time.perf_counter() - start, history.history


def on_ray(cfg: PipelineConfig, data: PreparedData) -> tuple[float, list[dict[str, float]]]:
    start = time.perf_counter()
    out = pretrain_encoder(cfg, data)
    return time.perf_counter() - start, out.history


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=25_600)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    storage = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    base = [
        "workspace=workspace/bench-ray",
        "data.dvc.enabled=false",
        f"data.unlabeled_limit={args.images}",
        f"pretrain.epochs={args.epochs}",
    ]
    variants = {
        "bare": [],
        "ray_1x2": ["ray.num_workers=1", "ray.cpus_per_worker=2"],
        "ray_2x1": ["ray.num_workers=2", "ray.cpus_per_worker=1"],
    }
    configs = {
        name: load_config(
            Path("params.yaml"), "default", [*base, *extra, f"ray.storage_path={storage / name}"]
        )
        for name, extra in variants.items()
    }
    data = ingest_and_prepare(configs["bare"])
    start = time.perf_counter()
    connect(configs["ray_2x1"])
    ray_init = time.perf_counter() - start
    results = {}
    try:
        for name, cfg in configs.items():
            wall, history = bare(cfg, data) if name == "bare" else on_ray(cfg, data)
            steady = [row["images_per_s"] for row in history[1:]] or [history[0]["images_per_s"]]
            results[name] = {
                "wall_seconds": round(wall, 1),
                "steady_images_per_s": round(sum(steady) / len(steady)),
                "final_loss": round(history[-1]["loss"], 4),
            }
            print(name, results[name], flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    cfg = configs["bare"]
    steps = args.images // cfg.pretrain.batch_size * args.epochs
    for name in ("ray_1x2", "ray_2x1"):
        r, b = results[name], results["bare"]
        r["wall_vs_bare"] = round(r["wall_seconds"] / b["wall_seconds"], 2)
        r["images_per_s_vs_bare"] = round(r["steady_images_per_s"] / b["steady_images_per_s"], 2)
        # Time not explained by steady training: worker start-up, first-epoch warm-up, checkpoints.
        r["fixed_seconds"] = round(
            r["wall_seconds"] - steps * cfg.pretrain.batch_size / r["steady_images_per_s"], 1
        )
    results["bare"]["fixed_seconds"] = round(
        results["bare"]["wall_seconds"]
        - steps * cfg.pretrain.batch_size / results["bare"]["steady_images_per_s"],
        1,
    )
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "method": cfg.pretrain.method,
        "backbone": cfg.model.backbone,
        "batch_size": cfg.pretrain.batch_size,
        "images": args.images,
        "epochs": args.epochs,
        "steps": steps,
        "ray_init_seconds": round(ray_init, 1),
        "variants": results,
        "command": f".venv/bin/python -m bench.ray_pretrain --images {args.images} --epochs {args.epochs}",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
