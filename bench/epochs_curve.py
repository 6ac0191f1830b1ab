"""What more pretraining buys: each protocol's test accuracy at one label budget against pretraining
epochs, supervised from scratch beside.

One pretraining per epoch count, each a complete run of the profile's recipe (its own warmup and
cosine schedule over its epochs; a point of a longer run's schedule would understate the short
runs), then the profile's sweep at the one budget: every protocol picks its config on the
budget's own selection share and runs it with every seed; each seed draws its own labels and
initialisation, the same for every protocol and epoch count, so the scratch cells are the same
run to run and the gains are paired by seed (mean and 95% interval). Distillation is left out
(it adds 0.1-0.3 points over its teacher here, at a third of the sweep's time).

    .venv/bin/python -m bench.epochs_curve [--epochs 1 3 10] [--fraction 0.01] [--profile default]

Writes bench/results/epochs_curve.json (every figure, the recipe, every label used) and the
figure beside it. A rerun takes finished pretraining from its checkpoints (the workspace's ray/).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from tasks.config import PipelineConfig, load_config
from tasks.data import ingest_and_prepare
from tasks.evaluate import LabelBudget
from tasks.plots import pretraining_curve
from tasks.pretrain import pretrain_encoder
from tasks.sweep import run_sweep

RESULTS = Path(__file__).parent / "results" / "epochs_curve.json"
PROTOCOLS = ("knn", "linear", "finetune", "supervised")


def curve_config(profile: str, epochs: int, fraction: float, overrides: list[str]) -> PipelineConfig:
    return load_config(
        "params.yaml",
        profile,
        [
            f"pretrain.epochs={epochs}",
            "evaluate.labels_per_class=[]",
            f"evaluate.label_fractions=[{fraction}]",
            f"evaluate.finetune_fractions=[{fraction}]",
            "evaluate.distill.enabled=false",
            *overrides,
        ],
    )


def point(cfg: PipelineConfig, epochs: int, fraction: float, data: Any) -> dict[str, Any]:
    """Pretrain for ``epochs`` (or take the finished run), sweep the budget; the row of figures."""
    start = time.perf_counter()
    pretrained = pretrain_encoder(cfg, data, on_epoch_end=lambda row: print(epochs, row, flush=True))
    pretrain_seconds = time.perf_counter() - start
    swept = run_sweep(cfg, data, pretrained.encoder_path)
    budget = LabelBudget(fraction=fraction)
    row: dict[str, Any] = {
        "epochs": epochs,
        "pretrain_seconds_this_run": round(pretrain_seconds, 1),
        "pretrain_resumed_from_step": pretrained.resumed_from_step,
        "final_loss": round(pretrained.history[-1]["loss"], 4) if pretrained.history else None,
        "sweep_seconds": round(swept.seconds, 1),
        "trials": len(swept.trials),
    }
    for protocol in PROTOCOLS:
        cell = swept.cell(protocol, budget)
        if cell is None:
            raise RuntimeError(f"the sweep has no {protocol} cell at {budget}")
        row["num_labels"] = cell.num_labels  # every label the cell used, selection share included
        row[protocol] = {
            "mean": round(100 * cell.mean, 2),
            "std": round(100 * cell.std, 2),
            "seeds": list(cell.seeds),
            "test": [round(100 * a, 2) for a in cell.test_accuracies],
            "params": cell.params,
        }
    for protocol in PROTOCOLS[:-1]:
        gain = swept.gains_over_supervised(protocol)[budget]
        row[f"{protocol}_minus_scratch"] = {
            "mean": round(100 * gain.mean, 2),
            "interval_95": gain.interval and [round(100 * x, 2) for x in gain.interval],
            "seeds": list(gain.seeds),
        }
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", nargs="+", type=int, default=[1, 3, 10])
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    configs = {e: curve_config(args.profile, e, args.fraction, args.overrides) for e in sorted(args.epochs)}
    base = configs[max(configs)]
    if base.num_threads:
        torch.set_num_threads(base.num_threads)
    data = ingest_and_prepare(base)
    ev = base.evaluate
    report: dict[str, Any] = {
        "command": "python -m bench.epochs_curve " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "recipe": {
            "profile": base.profile,
            "method": base.pretrain.method,
            "method_params": base.pretrain.method_params,
            "backbone": base.model.backbone,
            "unlabeled_images": data.unlabeled.num_images,
            "batch_size": base.pretrain.batch_size,
            "optimizer": base.pretrain.optimizer,
            "lr": base.pretrain.lr,
            "warmup_epochs": base.pretrain.warmup_epochs,
            "augment": base.augment.model_dump(mode="json"),
        },
        "evaluation": {
            "budget": str(LabelBudget(fraction=args.fraction)),
            "seeds": list(ev.seeds),
            "selection": ev.selection,
            "selection_share": ev.selection_share,
            "grid": ev.search.model_dump(mode="json"),
            "test_images": data.test.num_images,
        },
        "rows": [],
    }
    for epochs, cfg in configs.items():
        report["rows"].append(point(cfg, epochs, args.fraction, data))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["rows"][-1]), flush=True)
    figure_rows = [
        {"protocol": p, "epochs": row["epochs"], "mean": row[p]["mean"] / 100, "std": row[p]["std"] / 100}
        | {"n": len(row[p]["seeds"])}
        for row in report["rows"]
        for p in PROTOCOLS
    ]
    budget = f"{report['evaluation']['budget']} ({report['rows'][0]['num_labels']} labels)"
    figure = pretraining_curve(figure_rows, args.out.with_suffix(".png"), budget)
    report["figure"] = figure.name
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
