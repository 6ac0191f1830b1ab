"""The data step: ingest the configured sources into the dataset folders, check them, describe them.

Each dataset (unlabeled, labeled, test) is a folder of shards (``tasks.shards``) under
``<data.dvc.root>/<data.dvc.folder>/`` (under the workspace when DVC is off), tracked by DVC as
one folder, so what a run trained on is exactly a DVC version (``DatasetRef.dvc_md5``). A dataset
is identified by the SHA-256 of its images' ids and labels (``DatasetRef.digest``), read from its
manifest: the same images give the same hash wherever they came from, and no step re-reads the
images to know it.

A source whose listing (names, sizes, modification times or ETags, labels) has not changed since
its last ingest into the same folder is not read again, so a rerun on unchanged data costs a
listing. Images that appear in the test set and in a training set fail the step (a leak), unless
``data.allow_test_overlap``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from ssl_models.data import DataError, idx_file
from tasks.config import PipelineConfig
from tasks.ingest import ImageRules, IngestLimits, IngestReport, ingest
from tasks.shards import KnownImages, is_dataset, manifest_parts, summarize
from tasks.sources import Kind, SourceItem, first_images, idx_items, list_source, source_items

DATASETS = ("unlabeled", "labeled", "test")
TRAINING_SETS = ("unlabeled", "labeled")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetRef:
    name: str  # unlabeled | labeled | test
    path: str  # the dataset folder
    digest: str
    num_images: int
    classes: tuple[str, ...]  # the labeled set's classes, for the test set too: indices mean the same
    shards: tuple[str, ...] = ()  # relative to ``path``
    bytes: int = 0  # the images' bytes as stored
    dvc_md5: str | None = None  # the DVC version of the folder
    shard_uris: tuple[str, ...] = ()  # where runs read the shards when not from ``path`` (the DVC remote)

    def shard_paths(self) -> list[str]:
        return [str(Path(self.path) / shard) for shard in self.shards]


@dataclass(frozen=True)
class PreparedData:
    unlabeled: DatasetRef
    labeled: DatasetRef
    test: DatasetRef
    mean: float  # pixel statistics of the unlabeled images, which the encoder normalises with
    std: float

    def refs(self) -> tuple[DatasetRef, DatasetRef, DatasetRef]:
        return self.unlabeled, self.labeled, self.test

    def digests(self) -> dict[str, str]:
        return {ref.name: ref.digest for ref in self.refs()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreparedData:
        """The inverse of ``dataclasses.asdict`` after a JSON round trip."""

        def ref(r: dict[str, Any]) -> DatasetRef:
            lists = {key: tuple(r[key]) for key in ("classes", "shards", "shard_uris")}
            return DatasetRef(**{**r, **lists})

        return cls(ref(d["unlabeled"]), ref(d["labeled"]), ref(d["test"]), d["mean"], d["std"])


def data_root(cfg: PipelineConfig) -> Path:
    """Where the dataset folders live: the DVC repository, or the workspace when DVC is off."""
    return Path(cfg.data.dvc.root) if cfg.data.dvc.enabled else cfg.workspace_path


def dataset_folders(cfg: PipelineConfig) -> dict[str, Path]:
    """Each dataset's folder, relative to ``data_root``."""
    return {name: Path(cfg.data.dvc.folder) / name for name in DATASETS}


def _kind(name: str) -> Kind:
    return "unlabeled" if name == "unlabeled" else "labeled"


def source_of(cfg: PipelineConfig, name: str) -> tuple[str, Callable[[], Iterator[SourceItem]]]:
    """A dataset's configured source: its description, and its items (after the limit) as a
    function, since the step lists a source once to fingerprint it and again to ingest it."""
    d = cfg.data
    limit = {"unlabeled": d.unlabeled_limit, "labeled": d.labeled_limit, "test": d.test_limit}[name]
    if d.source == "fashion_mnist":
        root = Path(d.fashion_mnist_dir)
        stem = "t10k" if name == "test" else "train"
        images = idx_file(root, f"{stem}-images-idx3-ubyte")
        labels = None if name == "unlabeled" else idx_file(root, f"{stem}-labels-idx1-ubyte")
        description = str(images)

        def items() -> Iterator[SourceItem]:
            return islice(idx_items(images, labels), limit)

    else:
        location = str({"unlabeled": d.unlabeled_dir, "labeled": d.labeled_dir, "test": d.test_dir}[name])
        description = location

        def items() -> Iterator[SourceItem]:
            return first_images(source_items(location, _kind(name), d.source_endpoint_url, name), limit)

    return description, items


def _rules(cfg: PipelineConfig) -> ImageRules:
    return ImageRules(channels=cfg.data.channels)


def _limits(cfg: PipelineConfig) -> IngestLimits:
    i = cfg.data.ingest
    return IngestLimits(workers=i.workers, shard_mb=i.shard_mb, memory_mb=i.memory_mb)


def _ingest_key(cfg: PipelineConfig, fingerprint: str, folder: Path) -> str:
    """What an ingest depends on: the source's listing, the rules, and the folder's committed parts."""
    parts = [(p.name, p.stat().st_size) for p in manifest_parts(folder)]
    payload = json.dumps(
        [
            fingerprint,
            cfg.data.channels,
            str(folder.resolve()),
            parts,
        ]
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _ingest_state(cfg: PipelineConfig, name: str) -> Path:
    """The last ingest of a dataset's source: its key (what it depended on) and its report."""
    return cfg.workspace_path / "ingest" / f"{name}.json"


def ingest_sources(cfg: PipelineConfig) -> dict[str, IngestReport | None]:
    """Add the configured sources' new images to the dataset folders; fail on a test-set leak.

    A dataset whose source is unchanged since its last ingest is not read again (its report is
    None). The test set is ingested first, so that a test image in a training source is refused
    before it is stored (unless ``data.allow_test_overlap``).
    """
    reports: dict[str, IngestReport | None] = {}
    folders = {name: data_root(cfg) / relative for name, relative in dataset_folders(cfg).items()}
    for name in ("test", "unlabeled", "labeled"):
        folder = folders[name]
        convert_legacy_folder(folder, _kind(name), _rules(cfg), _limits(cfg))
        description, items = source_of(cfg, name)
        listing = list_source(items())
        state = _ingest_state(cfg, name)
        key = _ingest_key(cfg, listing.fingerprint, folder)
        if state.exists() and json.loads(state.read_text()).get("key") == key:
            reports[name] = None
            continue
        report = ingest(
            items(),
            _kind(name),
            folder,
            _rules(cfg),
            on_bad="quarantine" if cfg.data.skip_corrupt else "fail",
            quarantine=cfg.workspace_path / "quarantine" / name,
            allow_new_classes=True,
            source=description,
            limits=_limits(cfg),
            expected_bytes=listing.bytes,
            s3_endpoint=cfg.data.source_endpoint_url,
            forbidden={} if cfg.data.allow_test_overlap else _other_side(name, folders),
        )
        reports[name] = report
        state.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": _ingest_key(cfg, listing.fingerprint, folder), "report": report.as_dict()}
        state.write_text(json.dumps(record, indent=2) + "\n")
    check_test_overlap(folders, cfg.data.allow_test_overlap)
    return {name: reports[name] for name in DATASETS}


def _other_side(name: str, folders: dict[str, Path]) -> dict[str, KnownImages]:
    """The datasets ``name`` must share no image with: the training sets for the test set, and back."""
    others = list(TRAINING_SETS) if name == "test" else ["test"]
    return {other: KnownImages.of(folders[other]) for other in others if is_dataset(folders[other])}


@dataclass(frozen=True)
class Overlap:
    first: str
    second: str
    count: int
    examples: tuple[tuple[str, str], ...]  # (source in first, source in second)


def overlaps(folders: dict[str, Path]) -> list[Overlap]:
    """Images (by id) that two of the datasets both hold, with a few of their sources."""
    known = {name: KnownImages.of(folder) for name, folder in folders.items()}
    found = []
    names = list(folders)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = known[first].overlap(known[second])
            if shared:
                examples = zip(
                    known[first].sources(shared[:3]), known[second].sources(shared[:3]), strict=True
                )
                found.append(Overlap(first, second, len(shared), tuple(examples)))
    return found


def check_test_overlap(folders: dict[str, Path], allow: bool) -> list[Overlap]:
    """Raise ``DataError`` when the test set shares images with a training set (unless ``allow``)."""
    found = overlaps({name: folder for name, folder in folders.items() if is_dataset(folder)})
    leaks = [o for o in found if "test" in (o.first, o.second)]
    for shared in found:
        logger.info("%d images are in both the %s and the %s set", shared.count, shared.first, shared.second)
    if leaks and not allow:
        leak = leaks[0]
        training, test = (leak.first, leak.second) if leak.second == "test" else (leak.second, leak.first)
        where, test_source = leak.examples[0] if leak.second == "test" else leak.examples[0][::-1]
        raise DataError(
            f"{folders[test]}: {leak.count} test images are also in the {training} set, e.g. {test_source}"
            f" is {where}; remove them from the source or set data.allow_test_overlap: true"
        )
    return found


def prepare_data(cfg: PipelineConfig, dvc_versions: dict[str, str] | None = None) -> PreparedData:
    """The run's datasets as described by their manifests (``dvc_versions``: name -> DVC hash)."""
    root = data_root(cfg)
    summaries = {name: summarize(root / folder) for name, folder in dataset_folders(cfg).items()}
    mode = _rules(cfg).mode
    for name, summary in summaries.items():
        if summary.mode != mode:
            raise DataError(
                f"{summary.folder}: the {name} images were ingested as {summary.mode};"
                f" data.channels {cfg.data.channels} needs {mode}"
            )
    classes = summaries["labeled"].classes
    unknown = sorted(set(summaries["test"].classes) - set(classes))
    if unknown:
        raise DataError(
            f"{summaries['test'].folder}: test class {unknown[0]!r} is not one of the labeled classes"
            f" {list(classes)}"
        )
    versions = dvc_versions or {}
    refs = {
        name: DatasetRef(
            name,
            s.folder,
            s.digest,
            s.num_images,
            () if name == "unlabeled" else classes,
            s.shards,
            s.bytes,
            versions.get(name),
        )
        for name, s in summaries.items()
    }
    unlabeled = summaries["unlabeled"]
    return PreparedData(refs["unlabeled"], refs["labeled"], refs["test"], unlabeled.mean, unlabeled.std)


def ingest_and_prepare(cfg: PipelineConfig) -> PreparedData:
    """The data step without DVC (``data.dvc.enabled: false``, benchmarks, tests)."""
    ingest_sources(cfg)
    return prepare_data(cfg)


def is_legacy_folder(folder: Path) -> bool:
    """A dataset folder of the one-PNG-per-image layout (before shards)."""
    if not folder.is_dir() or is_dataset(folder):
        return False
    return any(folder.glob("*.png")) or any(folder.glob("*/*.png"))


def convert_legacy_folder(
    folder: Path, kind: Kind, rules: ImageRules, limits: IngestLimits
) -> IngestReport | None:
    """Rewrite a one-PNG-per-image dataset folder as shards (the PNGs' bytes, unchanged), once.

    The PNGs move aside while their bytes are ingested and are deleted once the shards are
    committed; DVC's cache still holds the old version.
    """
    if not is_legacy_folder(folder):
        return None
    aside = folder.with_name(f".{folder.name}.png-layout")
    if aside.exists():
        raise DataError(
            f"{aside}: a conversion of {folder} was interrupted; move the PNGs back into {folder}"
        )
    folder.rename(aside)
    try:
        report = ingest(
            source_items(str(aside), kind),
            kind,
            folder,
            rules,
            on_bad="fail",
            source=f"{folder} (one PNG per image)",
            limits=limits,
            expected_bytes=list_source(source_items(str(aside), kind)).bytes,
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # an aborted ingest committed nothing there
        aside.rename(folder)
        raise
    shutil.rmtree(aside)
    logger.warning("%s: converted %d PNG files to %d shards", folder, report.added, report.shards_written)
    return report
