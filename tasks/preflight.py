"""Checks before work: what can be known about a run before it ingests or trains, in seconds.

Each failure is one sentence naming the setting or the file, raised as ``ConfigError`` (a setting
the data or the machine cannot satisfy), ``DataError`` (the data) or ``ConnectionError`` (a
server). ``ssl-pipeline run --check`` runs only these; ``run`` runs them first. The sources are
listed, not read: one image of the labeled set is opened to show its format. The data step checks
the ingested datasets again (duplicates and refused images can lower the counts).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch

from ssl_models.backbones import create_backbone
from ssl_models.data import DataError
from tasks import cluster
from tasks.config import ConfigError, PipelineConfig
from tasks.data import DATASETS, data_root, dataset_folders, source_of
from tasks.evaluate import label_splits
from tasks.sources import SourceItem, image_format

SPACE_FACTOR = 2  # a dataset folder (about the source's bytes) and DVC's cache copy of it


@dataclass(frozen=True)
class SourceCount:
    """A dataset's source as its listing tells it: images, bytes, images per class."""

    name: str
    description: str
    images: int
    bytes: int
    classes: Counter[str]
    first: SourceItem | None


def count_source(cfg: PipelineConfig, name: str) -> SourceCount:
    description, items = source_of(cfg, name)
    images = size = 0
    classes: Counter[str] = Counter()
    first = None
    for item in items():
        if item.skipped:
            continue
        first = first or item
        images += 1
        size += item.size
        if item.label is not None:
            classes[item.label] += 1
    if images == 0:
        raise DataError(f"{description}: no images for the {name} set")
    return SourceCount(name, description, images, size, classes, first)


def _endpoints(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(URL, the settings that name it) of every server the run will use, when configured."""
    found = [
        (cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""), "tracking.tracking_uri"),
        (os.environ.get("PREFECT_API_URL", ""), "PREFECT_API_URL"),
        (cfg.data.source_endpoint_url or "", "data.source_endpoint_url"),
        (cfg.data.dvc.endpoint_url or "", "data.dvc.endpoint_url"),
        (cfg.ray.storage_endpoint_url or "", "ray.storage_endpoint_url"),
        (cfg.orchestration.results_endpoint_url or "", "orchestration.results_endpoint_url"),
    ]
    return [(url, setting) for url, setting in found if url.startswith(("http://", "https://"))]


def check_servers(cfg: PipelineConfig, timeout: float = 5.0) -> list[str]:
    """Every configured server answers a TCP connection (the Ray cluster: ``cluster.require_reachable``)."""
    cluster.require_reachable(cfg)
    reached = []
    for url, setting in _endpoints(cfg):
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
        except OSError as e:
            raise ConnectionError(f"cannot reach {url} ({setting}): {e.strerror or e}") from None
        reached.append(url)
    address = cluster.cluster_address(cfg)
    return [f"servers: {', '.join(reached + ([address] if address else [])) or 'none (all embedded)'}"]


def check_labels(cfg: PipelineConfig, labeled: SourceCount, test: SourceCount) -> str:
    """The test classes are labeled classes, and every label budget can be drawn (per class too)."""
    unseen = sorted(set(test.classes) - set(labeled.classes))
    if unseen:
        raise DataError(
            f"{test.description}: class {unseen[0]!r} of the test set has no labeled image in "
            f"{labeled.description}"
        )
    names = sorted(labeled.classes)
    labels = torch.tensor([i for i, c in enumerate(names) for _ in range(labeled.classes[c])])
    try:
        label_splits(labels, cfg.evaluate, cfg.seed)
    except ValueError as e:
        raise ConfigError(f"{e} ({labeled.description})") from None
    fewest = min(names, key=lambda c: labeled.classes[c])
    return (
        f"labels: {labeled.images} in {len(names)} classes (fewest: {labeled.classes[fewest]}, {fewest!r}); "
        f"test: {test.images}"
    )


def check_image_format(cfg: PipelineConfig, labeled: SourceCount) -> str:
    """The first labeled image's format beside what training makes of it."""
    item = labeled.first
    assert item is not None  # count_source refuses an empty source
    try:
        mode, width, height = image_format(item, cfg.data.source_endpoint_url)
        seen = f"{width}x{height} {mode}"
    except (OSError, ValueError) as e:
        raise DataError(f"{item.name}: cannot open the first labeled image ({e})") from None
    d = cfg.data
    return f"images: the first labeled one is {seen}; training at {d.image_size} px, {d.channels} channel(s)"


def check_backbone(cfg: PipelineConfig) -> str:
    """The backbone (with ``model.weights``, if given) takes images of ``data.image_size`` and
    ``data.channels``."""
    d, name, weights = cfg.data, cfg.model.backbone, cfg.model.weights
    cannot_take = f"model.backbone: {name} cannot take {d.image_size}x{d.image_size} images (data.image_size)"
    try:
        backbone = create_backbone(name, d.channels, d.image_size, weights).eval()
    except (OSError, RuntimeError) as e:  # the weights file: missing, unreadable, or another model's
        if not weights:
            raise
        raise ConfigError(
            f"model.weights: cannot load {weights} into {name} ({str(e).splitlines()[0]})"
        ) from None
    except ValueError as e:
        raise ConfigError(f"{cannot_take}: {e}") from None
    try:
        with torch.no_grad():
            features = backbone(torch.zeros(1, d.channels, d.image_size, d.image_size))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{cannot_take}: {str(e).splitlines()[0]}") from None
    return f"backbone: {name}{' from ' + weights if weights else ''}, {features.shape[1]} features"


def _stored_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def check_disk(cfg: PipelineConfig, counts: list[SourceCount]) -> str:
    """Free space where the datasets go for what the sources would add (and DVC's copy of it)."""
    root = data_root(cfg)
    folders = dataset_folders(cfg)
    new = sum(max(0, c.bytes - _stored_bytes(root / folders[c.name])) for c in counts)
    needed = SPACE_FACTOR * new
    probe = root.resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise ConfigError(
            f"data.dvc.root: {root} has {free / 2**30:.1f} GiB free, the datasets need about "
            f"{needed / 2**30:.1f} GiB (the sources' new bytes, twice: the dataset folders and DVC's cache)"
        )
    return f"disk: {free / 2**30:.1f} GiB free at {root}, about {needed / 2**30:.2f} GiB needed"


def preflight(cfg: PipelineConfig) -> list[str]:
    """Every check, in order of cost; returns what each found, raises on the first failure."""
    found = check_servers(cfg)
    found.append(check_backbone(cfg))
    counts = {name: count_source(cfg, name) for name in DATASETS}
    found.append(check_labels(cfg, counts["labeled"], counts["test"]))
    found.append(check_image_format(cfg, counts["labeled"]))
    found.append(check_disk(cfg, list(counts.values())))
    return found
