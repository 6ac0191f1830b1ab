"""Fine-tuning the pretrained encoder vs supervised from scratch, over several seeds.

The default run measures one seed; this repeats its fine-tuning comparison with other label
splits, initialisations and batch orders, to show how much of the gain is noise. It reuses
the default run's pretrained encoder (the checkpoint under workspace/pretrain/).

    .venv/bin/python -m bench.finetune_seeds [--seeds 0 1 2] [--profile default]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ssl_models.data import stratified_subset
from ssl_models.evaluate import accuracy, classify, finetune
from tasks.config import load_config
from tasks.data import ingest_and_prepare
from tasks.pretrain import build_encoder, load_encoder, pretrain_encoder
from tasks.streaming import read_images

RESULTS = Path(__file__).parent / "results" / "finetune_seeds.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--profile", default="default")
    args = parser.parse_args()

    cfg = load_config("params.yaml", args.profile)
    data = ingest_and_prepare(cfg)
    pretrained = pretrain_encoder(cfg, data)  # returns at once when the default run finished it
    encoder = load_encoder(cfg, data, pretrained.encoder_path)
    labeled, test = read_images(cfg, data.labeled), read_images(cfg, data.test)
    assert labeled.labels is not None and test.labels is not None
    ft = cfg.evaluate.finetune
    rows = []
    for fraction in cfg.evaluate.finetune_fractions:
        for seed in args.seeds:
            start = time.perf_counter()
            idx = stratified_subset(labeled.labels, fraction, seed)
            common = (
                labeled.images[idx],
                labeled.labels[idx],
                len(labeled.classes),
                ft.augment.params(),
                ft.settings(seed),
                ft.steps,
            )
            scratch = build_encoder(cfg.model_copy(update={"seed": seed}), data.mean, data.std)
            row = {
                "label_fraction": fraction,
                "seed": seed,
                "finetune": accuracy(classify(finetune(encoder, *common), test.images), test.labels),
                "supervised": accuracy(classify(finetune(scratch, *common), test.images), test.labels),
            }
            row["gain"] = row["finetune"] - row["supervised"]
            rows.append(row)
            print(row, f"{time.perf_counter() - start:.0f} s", flush=True)
    summary = {}
    for fraction in cfg.evaluate.finetune_fractions:
        gains = [r["gain"] for r in rows if r["label_fraction"] == fraction]
        summary[f"{fraction:g}"] = {
            "gain_mean": statistics.mean(gains),
            "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "seeds_with_positive_gain": sum(g > 0 for g in gains),
            "seeds": len(gains),
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python -m bench.finetune_seeds --seeds " + " ".join(map(str, args.seeds)),
                "profile": args.profile,
                "pretrain_sha": Path(pretrained.encoder_path).parent.name,
                "rows": rows,
                "summary": summary,
            },
            indent=2,
        )
        + "\n"
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
