"""The Ray Tune sweep with and without the frozen-feature cache: same trials, side by side in one run.

Only the protocols the cache serves (kNN and the linear probe, at every label fraction and over
the whole default grid, the best configs repeated over the seeds); fine-tuning reads images
either way. ``cache``: the features of the labeled and test sets are computed once (timed in
the run: the cache file is removed first) and shipped to every trial; ``no_cache``: each trial
runs the encoder over its own label subset, the validation split and the test set. The encoder
is the profile's pretraining (returned at once when a previous run finished it).

    .venv/bin/python -m bench.sweep_cache [--profile default]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import ray

from tasks.config import load_config
from tasks.data import ingest_and_prepare
from tasks.evaluate import feature_cache_path
from tasks.pretrain import connect, pretrain_encoder
from tasks.sweep import run_sweep

RESULTS = Path(__file__).parent / "results" / "sweep_cache.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="default")
    args = parser.parse_args()

    frozen_only = ["evaluate.finetune_fractions=[]", "evaluate.primary_protocol=linear"]
    base = load_config("params.yaml", args.profile, frozen_only)
    data = ingest_and_prepare(base)
    encoder_path = pretrain_encoder(base, data).encoder_path
    connect(base)

    variants = {}
    for name, cached in (("cache", True), ("no_cache", False)):
        cfg = load_config("params.yaml", args.profile, [*frozen_only, f"evaluate.feature_cache={cached}"])
        feature_cache_path(cfg, data, encoder_path).unlink(missing_ok=True)
        start = time.perf_counter()
        output = run_sweep(cfg, data, encoder_path)
        seconds = time.perf_counter() - start
        variants[name] = {
            "seconds": round(seconds, 1),
            "trials": len(output.trials),
            "stopped_early": sum(t.stopped_early for t in output.trials),
            "test_accuracy": {c.cell: round(c.mean, 4) for c in output.cells},
        }
        print(name, json.dumps(variants[name]), flush=True)

    cache, no_cache = variants["cache"], variants["no_cache"]
    differences = [abs(cache["test_accuracy"][k] - v) for k, v in no_cache["test_accuracy"].items()]
    report = {
        "command": f"python -m bench.sweep_cache --profile {args.profile}",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {ray.cluster_resources().get('CPU', 0):g} CPUs, no GPU",
        "what": "kNN + linear probe sweep (default grid and seeds), with and without the cache",
        "variants": variants,
        "no_cache_over_cache": round(no_cache["seconds"] / cache["seconds"], 2),
        "max_accuracy_difference": round(max(differences), 4),
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
