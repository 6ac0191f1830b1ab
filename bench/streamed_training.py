"""Fashion-MNIST on the default profile: pretraining fed through Ray Data from the shards (the
pipeline's path) against the whole unlabeled set as one tensor in the worker (the path before the
shards: ``ray.put`` of the images, ``ssl_models.train.TensorBatches``), side by side, interleaved;
and the data step on fresh and on unchanged data.

Both variants are one Ray Train worker with both CPUs, SimCLR on small_cnn, batch 256, the same
epochs; steady images/s are the epochs after the first. The data step is the flow's
(``ingest_sources``, ``version_datasets``, ``prepare_data``) without Prefect, in a process of its
own, on a fresh DVC repository and then again on the same data.

    .venv/bin/python -m bench.streamed_training [--epochs 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from bench.overhead import measure

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "streamed_training.json"
WORK = REPO / "workspace" / "bench" / "streamed"
TARGETS = {"streamed_to_in_memory_images_per_s": 0.95, "data_step_rerun_seconds": 10.0}


def data_step(workspace: Path) -> None:
    from tasks.config import load_config
    from tasks.data import ingest_sources, prepare_data
    from tasks.versioning import version_datasets

    cfg = load_config(
        REPO / "params.yaml", "default", [f"workspace={workspace}", f"data.dvc.root={workspace}"]
    )
    start = time.perf_counter()
    ingest_sources(cfg)
    ingested = time.perf_counter() - start
    versions = version_datasets(cfg)
    versioned = time.perf_counter() - start - ingested
    prepare_data(cfg, versions)
    print(
        json.dumps(
            {
                "ingest": ingested,
                "version": versioned,
                "prepare": time.perf_counter() - start - ingested - versioned,
            }
        )
    )


def in_memory_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker as it was before the shards: the whole set as one tensor."""
    import ray
    import ray.train
    import torch

    from ssl_models import create_method
    from ssl_models.train import pretrain
    from tasks.pretrain import build_encoder

    cfg = config["cfg"]
    images = torch.from_numpy(ray.get(config["images"]).copy())
    method = create_method(cfg.pretrain.method, build_encoder(cfg, config["mean"], config["std"]))
    result = pretrain(
        method,
        images,
        cfg.augment.params(),
        cfg.pretrain.settings(cfg.seed),
        device=ray.train.torch.get_device(),
    )
    # Ray Train keeps a run's metrics only beside a checkpoint: the history goes to a file (one machine).
    Path(config["history_file"]).write_text(json.dumps(result.history))


def run_in_memory(cfg: Any, data: Any, images_ref: Any, storage: Path) -> list[dict[str, float]]:
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from tasks.pretrain import scaling_config

    trainer = TorchTrainer(
        in_memory_worker,
        train_loop_config={
            "cfg": cfg,
            "images": images_ref,
            "mean": data.mean,
            "std": data.std,
            "history_file": str(storage / "history.json"),
        },
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name="in-memory", storage_path=str(storage)),
    )
    trainer.fit()
    history: list[dict[str, float]] = json.loads((storage / "history.json").read_text())
    return history


def steady(history: list[dict[str, float]]) -> float:
    rows = history[1:] or history
    return sum(r["images_per_s"] for r in rows) / len(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "data-step":
        return data_step(Path(argv[1]))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)  # also the DVC repository's root (a plain folder: dvc init --no-scm)

    steps = {}
    for name in ("fresh", "rerun"):
        measured = measure(
            [sys.executable, "-m", "bench.streamed_training", "data-step", str(WORK)],
            WORK / f"data-{name}.log",
        )
        if measured.returncode != 0:
            raise RuntimeError("\n".join(measured.tail))
        parts = json.loads(
            [line for line in (WORK / f"data-{name}.log").read_text().splitlines() if line.startswith("{")][
                -1
            ]
        )
        steps[name] = {**measured.row(), **{k: round(v, 1) for k, v in parts.items()}}
        print(name, steps[name], flush=True)

    import ray

    from tasks.cluster import connect
    from tasks.config import load_config
    from tasks.data import ingest_and_prepare
    from tasks.pretrain import pretrain_encoder
    from tasks.streaming import read_images

    overrides = [f"workspace={WORK}", f"data.dvc.root={WORK}", f"pretrain.epochs={args.epochs}"]
    base = load_config(REPO / "params.yaml", "default", overrides)
    data = ingest_and_prepare(base)
    connect(base)
    images_ref = ray.put(read_images(base, data.unlabeled).images.numpy())
    rows: dict[str, list[dict[str, Any]]] = {"in_memory": [], "streamed": []}
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(dir=WORK) as storage:
            cfg = load_config(REPO / "params.yaml", "default", [*overrides, f"ray.storage_path={storage}"])
            start = time.perf_counter()
            history = run_in_memory(cfg, data, images_ref, Path(storage))
            rows["in_memory"].append(
                {
                    "round": i,
                    "wall_seconds": round(time.perf_counter() - start, 1),
                    "steady_images_per_s": round(steady(history), 1),
                    "history": history,
                }
            )
            start = time.perf_counter()
            history = pretrain_encoder(cfg, data).history
            rows["streamed"].append(
                {
                    "round": i,
                    "wall_seconds": round(time.perf_counter() - start, 1),
                    "steady_images_per_s": round(steady(history), 1),
                    "history": history,
                }
            )
        print({k: [r["steady_images_per_s"] for r in v] for k, v in rows.items()}, flush=True)
    mean = {k: sum(r["steady_images_per_s"] for r in v) / len(v) for k, v in rows.items()}
    ratio = mean["streamed"] / mean["in_memory"]
    result = {
        "command": "python -m bench.streamed_training " + " ".join(argv),
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "targets": TARGETS,
        "data_step": steps,
        "pretraining": rows,
        "summary": {
            "in_memory_images_per_s": round(mean["in_memory"], 1),
            "streamed_images_per_s": round(mean["streamed"], 1),
            "streamed_to_in_memory": round(ratio, 3),
            "data_step_rerun_seconds": steps["rerun"]["seconds"],
            "met": {
                "throughput": ratio >= TARGETS["streamed_to_in_memory_images_per_s"],
                "data_step_rerun": steps["rerun"]["seconds"] <= TARGETS["data_step_rerun_seconds"],
            },
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
