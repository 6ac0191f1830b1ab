"""ssl-pipeline against LightlySSL, side by side in one run: label efficiency and pretraining speed.

Same machine, same Fashion-MNIST images (the DVC-versioned folders of ``prepare_data``), same
budget: the encoder (``model.backbone``, normalisation included), epochs, batch size, optimiser,
learning rate and warmup + cosine schedule, and the augmentation strengths (``augment``). What
differs is the framework: ours augments whole batches as tensors inside the training step
(``ssl_models``); LightlySSL's transforms run per PIL image in ``DataLoader`` workers, with its
heads and losses (``bench.lightly_peer``).

Both encoders, and supervised training from scratch on the same labels, are evaluated by the
same code (``tasks.evaluate.run_trial``): kNN and a linear probe on frozen features at 1% and
10% of the labels. Each cell picks its config (the sweep's grid, ``evaluate.search``) on its
selection labels (``evaluate.selection``), then runs it with every seed; test accuracy is mean +-
std over seeds.

Throughput is measured apart, ours and LightlySSL's interleaved on the same images after
warm-up steps, LightlySSL with each worker count of ``--workers`` (its best is the peer's figure).

    .venv/bin/python -m bench.peers [--epochs 2] [--methods simclr byol] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import torch

from bench.lightly_peer import (
    METHODS,
    lightly_loader,
    lightly_model,
    lightly_throughput,
    lightly_transform,
    train_lightly,
)
from ssl_models import create_method
from ssl_models.train import pretrain
from tasks.config import PipelineConfig, load_config
from tasks.data import PreparedData, ingest_and_prepare
from tasks.evaluate import EvalInputs, LabelBudget, TrialSpec, eval_inputs, run_trial
from tasks.pretrain import build_encoder, save_encoder
from tasks.streaming import read_images

RESULTS = Path(__file__).parent / "results" / "peers.json"
FRACTIONS = (0.01, 0.1)
PROTOCOLS = ("knn", "linear")  # on frozen features; "supervised" is the scratch baseline
TARGETS = {"linear_1pct_over_lightly": 2.0, "linear_1pct_over_scratch": 8.0, "throughput_ratio": 1.5}


def bench_config(profile: str, epochs: int | None, overrides: list[str]) -> PipelineConfig:
    sets = [
        f"evaluate.label_fractions={list(FRACTIONS)}",
        f"evaluate.finetune_fractions={list(FRACTIONS)}",
        "evaluate.labels_per_class=[]",
        *([f"pretrain.epochs={epochs}"] if epochs else []),
        *overrides,
    ]
    return load_config("params.yaml", profile, sets)


# -- pretraining ------------------------------------------------------------------------------


def ours(cfg: PipelineConfig, data: PreparedData) -> torch.nn.Module:
    encoder = build_encoder(cfg, data.mean, data.std)
    return create_method(cfg.pretrain.method, encoder, cfg.pretrain.method_params)


def theirs(cfg: PipelineConfig, data: PreparedData) -> torch.nn.Module:
    encoder = build_encoder(cfg, data.mean, data.std)  # the same seeded initialisation as ours
    return lightly_model(cfg.pretrain.method, encoder, encoder.num_features, cfg.pretrain.method_params)


def pretrain_ours(
    cfg: PipelineConfig, data: PreparedData, images: torch.Tensor, log: Callable[..., None]
) -> dict[str, Any]:
    method = ours(cfg, data)
    start = time.perf_counter()
    result = pretrain(method, images, cfg.augment.params(), cfg.pretrain.settings(cfg.seed), on_epoch_end=log)
    return {"model": method, "seconds": time.perf_counter() - start, "history": result.history}


def pretrain_lightly(
    cfg: PipelineConfig, data: PreparedData, images: torch.Tensor, workers: int, log: Callable[..., None]
) -> dict[str, Any]:
    model = theirs(cfg, data)
    transform = lightly_transform(cfg.pretrain.method, cfg.augment.params(), cfg.data.image_size)
    loader = lightly_loader(images, transform, cfg.pretrain.batch_size, workers, cfg.seed)
    start = time.perf_counter()
    history = train_lightly(model, loader, cfg.pretrain.settings(cfg.seed), on_epoch_end=log)
    return {"model": model, "seconds": time.perf_counter() - start, "history": history}


def throughput_ours(
    cfg: PipelineConfig, data: PreparedData, images: torch.Tensor, steps: int, warmup: int
) -> float:
    """Images/s of ``steps`` steps of the ssl_models loop after ``warmup`` steps."""
    method, batch = ours(cfg, data), cfg.pretrain.batch_size
    one_epoch = replace(cfg.pretrain.settings(cfg.seed), epochs=1, warmup_epochs=0.0)
    pretrain(method, images[: warmup * batch], cfg.augment.params(), one_epoch)
    result = pretrain(method, images[: steps * batch], cfg.augment.params(), one_epoch)
    return float(result.history[-1]["images_per_s"])


def throughput_lightly(
    cfg: PipelineConfig, data: PreparedData, images: torch.Tensor, workers: int, steps: int, warmup: int
) -> float:
    transform = lightly_transform(cfg.pretrain.method, cfg.augment.params(), cfg.data.image_size)
    n = (steps + warmup) * cfg.pretrain.batch_size
    loader = lightly_loader(images[:n], transform, cfg.pretrain.batch_size, workers, cfg.seed)
    settings = replace(cfg.pretrain.settings(cfg.seed), warmup_epochs=0.0)
    return lightly_throughput(theirs(cfg, data), loader, settings, "cpu", steps, warmup)


# -- evaluation -------------------------------------------------------------------------------


def select_and_run(
    cfg: PipelineConfig, inputs: EvalInputs, protocol: str, fraction: float, seeds: list[int]
) -> dict[str, Any]:
    """The grid point with the best validation accuracy (first seed), then every seed with it."""
    budget = LabelBudget(fraction=fraction)
    section = "finetune" if protocol == "supervised" else protocol
    searched = tuple(k for k, v in getattr(cfg.evaluate.search, section).items() if len(v) > 1)
    trials = [
        (point, run_trial(cfg, TrialSpec(protocol, budget, seeds[0], point, searched), inputs))
        for point in cfg.evaluate.grid(protocol)
    ]
    best, first = max(trials, key=lambda t: t[1].val_accuracy)
    outcomes = [first]
    if protocol != "knn":  # kNN has no seed
        outcomes += [
            run_trial(cfg, TrialSpec(protocol, budget, s, best, searched), inputs) for s in seeds[1:]
        ]
    accuracies = [100 * o.test_accuracy for o in outcomes]
    return {
        "mean": round(statistics.fmean(accuracies), 2),
        "std": round(statistics.stdev(accuracies), 2) if len(accuracies) > 1 else 0.0,
        "n": len(accuracies),
        "params": {k: best[k] for k in searched},
        "val_accuracy": round(100 * first.val_accuracy, 2),
    }


def evaluate(
    cfg: PipelineConfig, inputs: EvalInputs, protocols: tuple[str, ...], seeds: list[int]
) -> dict[str, Any]:
    return {
        f"{protocol}_{round(fraction * 100)}pct": select_and_run(cfg, inputs, protocol, fraction, seeds)
        for protocol in protocols
        for fraction in FRACTIONS
    }


# -- the run ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--epochs", type=int, default=2, help="pretraining epochs of both frameworks")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--workers", nargs="+", type=int, default=[0, 1, 2], help="LightlySSL's DataLoader workers to try"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--throughput-steps", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    overrides = [*args.overrides, f"evaluate.seeds={json.dumps(args.seeds)}"]  # the label splits drawn
    base = bench_config(args.profile, args.epochs, overrides)
    if base.num_threads:
        torch.set_num_threads(base.num_threads)
    data = ingest_and_prepare(base)
    images = read_images(base, data.unlabeled).images
    configs = {
        m: bench_config(args.profile, args.epochs, [*overrides, f"pretrain.method={m}"]) for m in args.methods
    }
    report: dict[str, Any] = {
        "command": "python -m bench.peers " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "budget": {
            "profile": base.profile,
            "backbone": base.model.backbone,
            "epochs": base.pretrain.epochs,
            "unlabeled_images": len(images),
            "batch_size": base.pretrain.batch_size,
            "optimizer": base.pretrain.optimizer,
            "lr": base.pretrain.lr,
            "augment": base.augment.model_dump(mode="json"),
        },
        "peer": f"lightly {_version('lightly')}",
        "targets": TARGETS,
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    # Throughput first, on a quiet machine: ours and LightlySSL's with each worker count, interleaved.
    speed: list[dict[str, Any]] = []
    for method, cfg in configs.items():
        row: dict[str, Any] = {
            "method": method,
            "ours": throughput_ours(cfg, data, images, args.throughput_steps, args.warmup_steps),
        }
        row["lightly_by_workers"] = {
            str(w): throughput_lightly(cfg, data, images, w, args.throughput_steps, args.warmup_steps)
            for w in args.workers
        }
        best_workers, best = max(row["lightly_by_workers"].items(), key=lambda kv: kv[1])
        row.update(lightly=best, lightly_workers=int(best_workers), ratio=row["ours"] / best)
        row = {k: (round(v, 2 if k == "ratio" else 1) if isinstance(v, float) else v) for k, v in row.items()}
        row["lightly_by_workers"] = {k: round(v, 1) for k, v in row["lightly_by_workers"].items()}
        speed.append(row)
        print(json.dumps(row), flush=True)
    report["throughput"] = speed
    save()

    quality: list[dict[str, Any]] = []
    scratch: dict[str, Any] | None = None
    folder = base.workspace_path / "bench" / "peers"
    for method, cfg in configs.items():
        workers = next(r["lightly_workers"] for r in speed if r["method"] == method)
        runs = {
            "ssl-pipeline": lambda c=cfg, m=method: pretrain_ours(c, data, images, _log("ours", m)),
            "lightly": lambda c=cfg, m=method, w=workers: pretrain_lightly(
                c, data, images, w, _log("lightly", m)
            ),
        }
        for framework, run in runs.items():
            trained = run()
            path = save_encoder(
                {"model": trained["model"].state_dict()}, _mkdir(folder) / f"{framework}-{method}.pt"
            )
            inputs = eval_inputs(cfg, data, path)
            if scratch is None:  # the baseline needs no encoder: once, beside the first
                scratch = evaluate(cfg, inputs, ("supervised",), args.seeds)
                report["supervised_from_scratch"] = scratch
            cells = evaluate(cfg, inputs, PROTOCOLS, args.seeds)
            history = trained["history"]
            row = {
                "framework": framework,
                "method": method,
                **cells,
                "pretrain_seconds": round(trained["seconds"], 1),
                "epoch_images_per_s": [round(h["images_per_s"]) for h in history],
                "final_loss": round(history[-1]["loss"], 4),
            }
            quality.append(row)
            print(json.dumps(row), flush=True)
            report["quality"] = quality
            save()
    report["summary"] = summary(report)
    save()
    print(json.dumps(report["summary"], indent=2))
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's three targets, per method: the figure, the target, and whether it is met."""
    rows = {(r["framework"], r["method"]): r for r in report["quality"]}
    scratch = report["supervised_from_scratch"]["supervised_1pct"]["mean"]
    out: dict[str, Any] = {}
    for speed in report["throughput"]:
        method = speed["method"]
        ours, theirs = rows.get(("ssl-pipeline", method)), rows.get(("lightly", method))
        entry: dict[str, Any] = {
            "throughput_ratio": speed["ratio"],
            "throughput_met": speed["ratio"] >= TARGETS["throughput_ratio"],
        }
        if ours and theirs:
            over_lightly = ours["linear_1pct"]["mean"] - theirs["linear_1pct"]["mean"]
            over_scratch = ours["linear_1pct"]["mean"] - scratch
            entry |= {
                "linear_1pct_over_lightly": round(over_lightly, 2),
                "linear_1pct_over_lightly_met": over_lightly >= TARGETS["linear_1pct_over_lightly"],
                "linear_1pct_over_scratch": round(over_scratch, 2),
                "linear_1pct_over_scratch_met": over_scratch >= TARGETS["linear_1pct_over_scratch"],
            }
        out[method] = entry
    return out


def _log(framework: str, method: str) -> Callable[[dict[str, float]], None]:
    return lambda row: print(
        framework, method, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True
    )


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
