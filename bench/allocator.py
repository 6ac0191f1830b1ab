"""The Ray workers' allocator (``ray.worker_allocator``): the system's malloc (glibc) against jemalloc
keeping its freed pages (``tasks.cluster.JEMALLOC_CONF``), side by side, interleaved, on the
pipeline's own pretraining path (``tasks.pretrain.pretrain_encoder`` on Ray Train, data through
Ray Data), each run a driver process of its own, since the allocator is set when Ray starts:

- ``fmnist``: the default profile (Fashion-MNIST, 28 px, one worker with both CPUs);
- ``photos``: bench.scale's epoch (real JPEG photos at 96 px RGB, one worker of 1 CPU, the other
  decoding), on a smaller folder.

Each run is two epochs; images/s is the second's; peak RSS and PSS are the process tree's.

    .venv/bin/python -m bench.allocator [--rounds 2] [--photos 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from datetime import date
from pathlib import Path
from typing import Any

from bench.overhead import measure
from bench.scale import EPOCH_SETTINGS, _last_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "allocator.json"
WORK = REPO / "workspace" / "bench" / "allocator"
ALLOCATORS = ("system", "jemalloc")
FMNIST_SETTINGS = [f"workspace={WORK / 'fmnist'}", f"data.dvc.root={WORK / 'fmnist'}"]


def epoch(workload: str, allocator: str, storage: Path) -> None:
    """Two pretraining epochs of ``workload`` with ``allocator``: the history as JSON."""
    from tasks.config import load_config
    from tasks.data import DatasetRef, PreparedData, ingest_and_prepare
    from tasks.pretrain import pretrain_encoder
    from tasks.shards import summarize

    common = [f"ray.worker_allocator={allocator}", f"ray.storage_path={storage}", "pretrain.epochs=2"]
    if workload == "fmnist":
        cfg = load_config(REPO / "params.yaml", "default", [*FMNIST_SETTINGS, *common])
        data = ingest_and_prepare(cfg)
    else:
        settings = [f"workspace={WORK / 'photos-ws'}", *EPOCH_SETTINGS, *common]
        cfg = load_config(REPO / "params.yaml", "default", settings)
        s = summarize(WORK / "photos-data")
        ref = DatasetRef("unlabeled", s.folder, s.digest, s.num_images, (), s.shards, s.bytes)
        data = PreparedData(ref, ref, ref, s.mean, s.std)
    print(json.dumps({"history": pretrain_encoder(cfg, data).history}))


def prepare(photos: int) -> None:
    """Fashion-MNIST ingested into the workspace, and a folder of ``photos`` JPEGs as shards."""
    from bench.photos import write_photo_folder
    from tasks.config import load_config
    from tasks.data import ingest_and_prepare
    from tasks.ingest import ImageRules, ingest
    from tasks.sources import folder_items

    ingest_and_prepare(load_config(REPO / "params.yaml", "default", FMNIST_SETTINGS))
    write_photo_folder(WORK / "photos", photos)
    ingest(folder_items(WORK / "photos", "unlabeled"), "unlabeled", WORK / "photos-data", ImageRules(3))
    shutil.rmtree(WORK / "photos")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "epoch":
        return epoch(argv[1], argv[2], Path(argv[3]))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--photos", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    prepare(args.photos)

    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for workload in ("fmnist", "photos"):
            for allocator in ALLOCATORS:
                name = f"{workload}-{allocator}-{round_}"
                command = [sys.executable, "-m", "bench.allocator", "epoch", workload, allocator]
                measured = measure([*command, str(WORK / "ray" / name)], WORK / f"{name}.log")
                if measured.returncode != 0:
                    raise RuntimeError(f"{name} failed:\n" + "\n".join(measured.tail))
                history = _last_json((WORK / f"{name}.log").read_text())["history"]
                runs.append(
                    {
                        "workload": workload,
                        "allocator": allocator,
                        "round": round_,
                        **measured.row(),
                        "images_per_s": round(history[-1]["images_per_s"], 1),
                        "data_wait_share": round(history[-1]["data_wait_share"], 3),
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
    shutil.rmtree(WORK, ignore_errors=True)

    def mean(workload: str, allocator: str, key: str) -> float:
        rows = [r[key] for r in runs if r["workload"] == workload and r["allocator"] == allocator]
        return sum(rows) / len(rows)

    summary = {
        workload: {
            "images_per_s": {a: round(mean(workload, a, "images_per_s"), 1) for a in ALLOCATORS},
            "peak_tree_pss_mb": {a: round(mean(workload, a, "peak_tree_pss_mb")) for a in ALLOCATORS},
            "jemalloc_to_system_images_per_s": round(
                mean(workload, "jemalloc", "images_per_s") / mean(workload, "system", "images_per_s"), 2
            ),
            "jemalloc_to_system_peak_pss": round(
                mean(workload, "jemalloc", "peak_tree_pss_mb") / mean(workload, "system", "peak_tree_pss_mb"),
                2,
            ),
        }
        for workload in ("fmnist", "photos")
    }
    result = {
        "command": "python -m bench.allocator " + " ".join(argv),
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "runs": runs,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
