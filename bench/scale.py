"""The data plane at scale: folders of real JPEG photos (``bench.photos``: crops of scikit-learn's two
photographs, sides 96-384 px) at 20k, 50k and 200k images, each through what a team runs.

Per size, each step a process of its own, its wall time and the peak RSS of its process tree
sampled (``bench.overhead.measure``):

1. ingest: ``tasks.ingest`` streams the folder into a dataset folder of shards (no DVC);
2. ``dvc add`` of the dataset folder, ``dvc status`` against the remote, ``dvc push`` to an S3 remote
   (SeaweedFS on loopback); DVC's cache hard-links the shards (``cache.type hardlink``), so the
   shards are on disk twice (source, dataset folder = cache), plus the remote;
3. an incremental ingest of 1% new photos, ``dvc add``, and ``dvc push``: the files it uploads;
4. one pretraining epoch at 96 px RGB (SimCLR, small_cnn, batch 256) streamed from the shards
   through Ray Data into one Ray Train worker of 1 CPU (the other decodes): images/s, the share
   of the time the worker waited for data, and the peak RSS of the whole tree (Ray's processes too).
   Ray Data holds at most ``data.streaming.object_store_mb`` (1 GB by default) of decoded blocks in
   the object store, whatever the dataset's size.

With ``--gpu`` (a machine with an NVIDIA GPU) the epoch is the ``full`` profile's: 224 px,
ResNet-50, bf16, one GPU worker with 2 CPUs, the other cores decoding; ``nvidia-smi`` is sampled
every second for the GPU's utilisation.

The generated folders are deleted after each size (``--keep`` keeps them).

    .venv/bin/python -m bench.scale [--sizes 20000 50000 200000] [--no-epoch] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

from bench.overhead import measure
from bench.photos import write_photo_folder

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "scale.json"
WORK = REPO / "workspace" / "bench" / "scale"
TARGETS = {"rss_ratio_largest_to_smallest": 1.2, "stored_to_source_bytes": 1.05}
EPOCH_SETTINGS = [
    "data.channels=3",
    "data.image_size=96",
    "pretrain.epochs=1",
    "pretrain.batch_size=256",
    "data.streaming.materialize=never",
    "ray.num_workers=1",
    "ray.cpus_per_worker=1",
]
GPU_EPOCH_SETTINGS = [
    *EPOCH_SETTINGS,
    "data.image_size=224",
    "model.backbone=resnet50",
    "pretrain.precision=bf16",
    "ray.use_gpu=true",
    "ray.cpus_per_worker=2",
    "data.streaming.object_store_mb=8192",  # the full profile's: many decoding CPUs keep more in flight
]


def ingest_step(source: Path, dest: Path) -> None:
    """Step 1 (and 3): the streaming ingest alone, as ``ssl-pipeline data ingest`` runs it."""
    from tasks.ingest import ImageRules, ingest
    from tasks.sources import folder_items, list_source

    size = list_source(folder_items(source, "unlabeled")).bytes
    report = ingest(folder_items(source, "unlabeled"), "unlabeled", dest, ImageRules(3), expected_bytes=size)
    print(json.dumps({k: v for k, v in report.as_dict().items() if k != "quarantined"}))


def epoch_step(folder: Path, workspace: Path, gpu: bool) -> None:
    """Step 4: one pretraining epoch on Ray Train, streamed from the folder's shards."""
    from tasks.config import load_config
    from tasks.data import DatasetRef, PreparedData
    from tasks.pretrain import pretrain_encoder
    from tasks.shards import summarize

    settings = GPU_EPOCH_SETTINGS if gpu else EPOCH_SETTINGS
    cfg = load_config(REPO / "params.yaml", "default", [f"workspace={workspace}", *settings])
    s = summarize(folder)
    ref = DatasetRef("unlabeled", s.folder, s.digest, s.num_images, (), s.shards, s.bytes)
    out = pretrain_encoder(cfg, PreparedData(ref, ref, ref, s.mean, s.std))
    print(json.dumps(out.history[0]))


def _last_json(text: str) -> dict[str, Any]:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def _dvc(repo: Path, *args: str, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=7200)
    if out.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed: {out.stdout}{out.stderr}")
    return time.perf_counter() - start, out.stdout + out.stderr


def _pushed(output: str) -> int:
    found = re.search(r"(\d+) files? pushed", output)
    return int(found.group(1)) if found else 0


def _step(name: str, *args: str, log: Path) -> tuple[Any, dict[str, Any]]:
    measured = measure([sys.executable, "-m", "bench.scale", name, *args], log)
    if measured.returncode != 0:
        raise RuntimeError(f"{name} failed; see {log}:\n" + "\n".join(measured.tail))
    return measured, _last_json(log.read_text())


class GpuUtilisation:
    """The GPU's utilisation (``nvidia-smi``, every second) while the block runs: its mean, in %.

    Inactive (no GPU to watch), it samples nothing.
    """

    def __init__(self, active: bool) -> None:
        self.samples: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.active = active

    def __enter__(self) -> GpuUtilisation:
        if self.active:
            self._thread.start()
        return self

    def _sample(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._done.wait(1.0):
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout.split()
            if out:
                self.samples.append(sum(float(v) for v in out) / len(out))

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self.active:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def one_size(count: int, s3: Any, epoch: bool, keep: bool, gpu: bool) -> dict[str, Any]:
    work = WORK / f"{count}"
    shutil.rmtree(work, ignore_errors=True)
    source, extra, repo = work / "photos", work / "photos-new", work / "repo"
    start = time.perf_counter()
    source_bytes = write_photo_folder(source, count)
    generated = time.perf_counter() - start
    env = {
        **os.environ,
        **s3.env(),
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    repo.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    s3.client().create_bucket(Bucket=f"scale-{count}")
    _dvc(repo, "init", "-q", env=env)
    _dvc(repo, "remote", "add", "-d", "storage", f"s3://scale-{count}/dvc", env=env)
    _dvc(repo, "remote", "modify", "storage", "endpointurl", s3.endpoint_url, env=env)
    _dvc(repo, "config", "cache.type", "hardlink", env=env)
    folder = repo / "data" / "unlabeled"

    ingest, report = _step("ingest-step", str(source), str(folder), log=work / "ingest.log")
    add_s, _ = _dvc(repo, "add", "data/unlabeled", env=env)
    status_s, _ = _dvc(repo, "status", "--cloud", "data/unlabeled.dvc", env=env)
    push_s, push_out = _dvc(repo, "push", "data/unlabeled.dvc", env=env)
    shards = sorted((folder / "shards").glob("*.parquet"))
    stored = sum(p.stat().st_size for p in shards)

    new_count = count // 100
    new_bytes = write_photo_folder(extra, new_count, start=count)
    more, more_report = _step("ingest-step", str(extra), str(folder), log=work / "ingest-new.log")
    more_add_s, _ = _dvc(repo, "add", "data/unlabeled", env=env)
    more_push_s, more_push_out = _dvc(repo, "push", "data/unlabeled.dvc", env=env)
    new_files = more_report["shards_written"] + 2  # its manifest part and its ingest record
    row: dict[str, Any] = {
        "images": count,
        "source_mb": round(source_bytes / 1e6, 1),
        "generate_seconds": round(generated, 1),
        "ingest": {
            **ingest.row(),
            "images_per_s": round(count / ingest.seconds),
            "added": report["added"],
        },
        "shards": len(shards),
        "stored_mb": round(stored / 1e6, 1),
        "stored_to_source_bytes": round(stored / source_bytes, 4),
        "dvc_add_seconds": round(add_s, 1),
        "dvc_status_seconds": round(status_s, 1),
        "dvc_push_seconds": round(push_s, 1),
        "dvc_push_files": _pushed(push_out),
        "incremental": {
            "new_images": new_count,
            "new_mb": round(new_bytes / 1e6, 2),
            "ingest_seconds": round(more.seconds, 1),
            "dvc_add_seconds": round(more_add_s, 1),
            "dvc_push_seconds": round(more_push_s, 1),
            "files_pushed": _pushed(more_push_out),
            "new_files": new_files,
            "only_new_files_pushed": _pushed(more_push_out) == new_files + 1,  # and DVC's directory listing
        },
    }
    if epoch:
        args = [str(folder), str(work / "ws"), *(["--gpu"] if gpu else [])]
        with GpuUtilisation(gpu) as utilisation:
            measured, history = _step("epoch-step", *args, log=work / "epoch.log")
        row["epoch"] = {
            **measured.row(),
            "images_per_s": round(history["images_per_s"], 1),
            "data_wait_share": round(history["data_wait_share"], 3),
            **({"gpu_utilisation_percent": utilisation.mean} if gpu else {}),
        }
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    small, large = rows[0], rows[-1]
    out: dict[str, Any] = {
        "ingest_rss_ratio": round(
            large["ingest"]["peak_tree_rss_mb"] / small["ingest"]["peak_tree_rss_mb"], 2
        ),
        "max_stored_to_source_bytes": max(r["stored_to_source_bytes"] for r in rows),
        "incremental_pushes_only_new_files": all(r["incremental"]["only_new_files_pushed"] for r in rows),
    }
    if "epoch" in large:
        for memory in ("rss", "pss"):
            out[f"epoch_{memory}_ratio"] = round(
                large["epoch"][f"peak_tree_{memory}_mb"] / small["epoch"][f"peak_tree_{memory}_mb"], 2
            )
    out["met"] = {
        "rss": max(out["ingest_rss_ratio"], out.get("epoch_rss_ratio", 0))
        <= TARGETS["rss_ratio_largest_to_smallest"],
        "bytes": out["max_stored_to_source_bytes"] <= TARGETS["stored_to_source_bytes"],
        "incremental": out["incremental_pushes_only_new_files"],
    }
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "ingest-step":
        return ingest_step(Path(argv[1]), Path(argv[2]))
    if argv and argv[0] == "epoch-step":
        return epoch_step(Path(argv[1]), Path(argv[2]), gpu="--gpu" in argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 200_000])
    parser.add_argument("--no-epoch", dest="epoch", action="store_false")
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    parser.add_argument("--gpu", action="store_true", help="the epoch at 224 px, ResNet-50, bf16 on a GPU")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from tests.s3_server import SeaweedS3

    rows = []
    shutil.rmtree(WORK, ignore_errors=True)
    with SeaweedS3(WORK / "seaweedfs") as s3:
        for count in sorted(args.sizes):
            rows.append(one_size(count, s3, args.epoch, args.keep, args.gpu))
            print(json.dumps(rows[-1]), flush=True)
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    result = {
        "command": "python -m bench.scale " + " ".join(argv),
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "targets": TARGETS,
        "rows": rows,
        "summary": summary(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
