"""What the orchestration costs: ``ssl-pipeline run`` (Prefect + Ray + MLflow + DVC) against the
bare ``ssl_models`` loop doing the same work, and the peak memory of both and of the data step.

Three processes, one after the other, in a fresh workspace (``workspace/bench/overhead``):

1. the data step (``python -m bench.overhead data``): the flow's data tasks without Prefect,
   ingest Fashion-MNIST into DVC-tracked folders, version and push them, load them as tensors;
2. the bare loop (``python -m bench.overhead bare``): read those folders, pretrain the same epochs
   with ``ssl_models.train.pretrain`` in the process, then the same evaluation trials with
   ``tasks.evaluate.run_trial``; no Prefect, Ray, MLflow or DVC;
3. ``ssl-pipeline run`` on the same workspace: Prefect's ephemeral API, the data step (the
   images already ingested and their DVC hashes unchanged: checked, not redone), pretraining
   on Ray Train, the sweep on Ray Tune, MLflow logging, the registry and the promotion gate.

Both do the same pretraining (the profile's epochs, images and batch) and the same evaluation:
the sweep is cut to one config per cell (kNN and linear probe at 1% of the labels, seed 0) so
that the compared work is pretraining, which is what the ratio is about. Wall times are of
the processes, Python start-up and imports included. Memory is sampled every 0.2 s: the sum of
the resident set sizes of the process and all its descendants (Ray's raylet, GCS and workers;
shared pages count once per process, so the sum overstates), and the largest single process.

    .venv/bin/python -m bench.overhead [--profile default] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "overhead.json"
CLI = [sys.executable, "-m", "flows.cli"]
# One config per cell, kNN and linear probe at 1% of the labels, one seed: the compared work is
# pretraining. The ratio is about the orchestration, not about how many trials a sweep runs.
SAME_WORK = [
    "evaluate.label_fractions=[0.01]",
    "evaluate.finetune_fractions=[]",
    "evaluate.labels_per_class=[]",
    "evaluate.primary_protocol=linear",
    "evaluate.seeds=[0]",
    "evaluate.search.knn={k: [200]}",
    "evaluate.search.linear={lr: [0.01], weight_decay: [0.0001]}",
]
TARGETS = {"ratio": 1.10, "fixed_seconds": 20.0}


@dataclass
class Measured:
    seconds: float
    peak_tree_rss_mb: float
    peak_process_rss_mb: float
    peak_tree_pss_mb: float
    returncode: int
    samples: int = 0
    tail: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1),
            "peak_tree_rss_mb": round(self.peak_tree_rss_mb),
            "peak_process_rss_mb": round(self.peak_process_rss_mb),
            "peak_tree_pss_mb": round(self.peak_tree_pss_mb),
        }


def _pss(pid: int) -> int:
    """A process's proportional set size in bytes (Linux's ``smaps_rollup``; OSError where there is none)."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    line = next((line for line in text.splitlines() if line.startswith("Pss:")), "Pss: 0 kB")
    return int(line.split()[1]) * 1024


def measure(command: list[str], log: Path, interval: float = 1.0) -> Measured:
    """Run ``command``; its wall time and the peak memory of its process tree, sampled every
    ``interval`` seconds.

    The tree's RSS counts a page shared by several processes (Ray's object store, libraries) once
    per process; its PSS shares each such page out among them, so it sums to what the tree holds.
    Reading PSS walks each process's page tables: at 5 samples a second over a Ray run's dozen
    processes the sampler took 80-90% of a core (measured), a second is cheap.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    peaks = {"tree": 0, "process": 0, "pss": 0, "samples": 0}
    with log.open("w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(child.pid)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    return
                sizes, pss = [], 0
                for p in procs:
                    with contextlib.suppress(psutil.Error, OSError):  # gone between listing and reading
                        sizes.append(p.memory_info().rss)
                        pss += _pss(p.pid)
                peaks["tree"] = max(peaks["tree"], sum(sizes))
                peaks["pss"] = max(peaks["pss"], pss)
                peaks["process"] = max(peaks["process"], max(sizes, default=0))
                peaks["samples"] += 1
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = child.wait()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    tail = log.read_text(errors="replace").splitlines()[-15:]
    mb = 1024 * 1024
    return Measured(
        seconds, peaks["tree"] / mb, peaks["process"] / mb, peaks["pss"] / mb, code, peaks["samples"], tail
    )


def sets(workspace: Path, overrides: list[str]) -> list[str]:
    keys = [f"workspace={workspace}", f"data.dvc.root={workspace / 'dvc-repo'}", *SAME_WORK, *overrides]
    return [arg for key in keys for arg in ("--set", key)]


def data_step(profile: str, overrides: list[str]) -> None:
    """The flow's data step (``flows.pipeline.data_stage``) without Prefect; its result for ``bare``."""
    from dataclasses import asdict

    from tasks.config import load_config
    from tasks.data import ingest_sources, prepare_data
    from tasks.versioning import version_datasets

    cfg = load_config(REPO / "params.yaml", profile, overrides)
    ingest_sources(cfg)
    prepared = prepare_data(cfg, version_datasets(cfg))
    path = cfg.workspace_path / "stages" / "prepare.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(prepared), indent=2) + "\n")


def bare(profile: str, overrides: list[str]) -> None:
    """The same pretraining and evaluation as the run, in this process, on the versioned folders."""
    import torch

    from ssl_models import create_method
    from ssl_models.train import pretrain
    from tasks.config import load_config
    from tasks.data import PreparedData
    from tasks.evaluate import eval_inputs, run_trial, trial_specs
    from tasks.pretrain import build_encoder, save_encoder
    from tasks.streaming import read_images

    cfg = load_config(REPO / "params.yaml", profile, overrides)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data = PreparedData.from_dict(json.loads((cfg.workspace_path / "stages" / "prepare.json").read_text()))
    images = read_images(cfg, data.unlabeled).images
    method = create_method(
        cfg.pretrain.method, build_encoder(cfg, data.mean, data.std), cfg.pretrain.method_params
    )
    result = pretrain(method, images, cfg.augment.params(), cfg.pretrain.settings(cfg.seed))
    folder = cfg.workspace_path / "bare"
    folder.mkdir(parents=True, exist_ok=True)
    path = save_encoder({"model": method.state_dict()}, folder / "encoder.pt")
    inputs = eval_inputs(cfg, data, path)
    accuracy = {
        spec.cell: run_trial(cfg, spec, inputs).test_accuracy
        for spec in trial_specs(cfg, cfg.seed, search=False)
    }
    summary = {"images_per_s": [round(r["images_per_s"]) for r in result.history], "accuracy": accuracy}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "data", "bare"])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workspace", type=Path, default=REPO / "workspace" / "bench" / "overhead")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.mode != "all":
        {"data": data_step, "bare": bare}[args.mode](args.profile, args.overrides)
        return {}

    workspace = args.workspace.resolve()
    shutil.rmtree(workspace, ignore_errors=True)
    common = ["--profile", args.profile, *sets(workspace, args.overrides)]
    logs = workspace.parent / "overhead-logs"
    steps: dict[str, Measured] = {}
    commands = {
        "data_step": [sys.executable, "-m", "bench.overhead", "data", *common],
        "bare": [sys.executable, "-m", "bench.overhead", "bare", *common],
        "run": [*CLI, "run", *common, "--report", str(workspace / "run-report.json")],
    }
    for name, command in commands.items():
        if name == "run":  # the bare loop's encoder may equal Ray's: no shared feature cache
            shutil.rmtree(workspace / "features", ignore_errors=True)
        steps[name] = measured = measure(command, logs / f"{name}.log")
        print(name, json.dumps(measured.row()), flush=True)
        if measured.returncode:
            raise SystemExit(
                f"{name} failed (exit {measured.returncode}); see {logs / name}.log:\n"
                + "\n".join(measured.tail)
            )

    run_report = json.loads((workspace / "run-report.json").read_text())
    bare_summary = json.loads((workspace / "bare" / "summary.json").read_text())
    run, loop = steps["run"], steps["bare"]
    ratio, fixed = run.seconds / loop.seconds, run.seconds - loop.seconds
    report = {
        "command": "python -m bench.overhead " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, CPU",
        "profile": args.profile,
        "same_work": SAME_WORK,
        "pretrain_epochs": run_report.get("pretrain_epochs"),
        "unlabeled_images": run_report.get("unlabeled_images"),
        "data_step": steps["data_step"].row(),
        "bare": {**loop.row(), **bare_summary},
        "run": {
            **run.row(),
            "images_per_s": run_report.get("pretrain_images_per_s"),
            "in_process_seconds": run_report.get("wall_seconds"),
            "sweep_seconds": run_report.get("sweep_seconds"),
            "accuracy": {
                f"{a['protocol']}-{a['budget']}": round(a["mean"], 4) for a in run_report.get("accuracy", [])
            },
        },
        "ratio": round(ratio, 3),
        "fixed_seconds": round(fixed, 1),
        "targets": TARGETS,
        "met": {"ratio": ratio <= TARGETS["ratio"], "fixed_seconds": fixed < TARGETS["fixed_seconds"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("data_step", "ratio", "fixed_seconds", "met")}, indent=2))
    return report


if __name__ == "__main__":
    main()
