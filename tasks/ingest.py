"""Ingest images into the canonical layout that DVC versions, validating every file.

A dataset folder holds PNG files named by the content of their pixels:

    unlabeled:  <dest>/<id>.png
    labeled:    <dest>/<class>/<id>.png

where ``id`` is the first 32 hex digits of the SHA-256 of the decoded image (mode, size and
pixels). The same image is one file however often, and from wherever, it is ingested, and
adding images adds files without rewriting the others, so DVC re-hashes and uploads only
what is new.

Every source file is decoded and checked (it decodes, its mode converts to the dataset's,
its sides are within bounds). A bad file is copied to the quarantine folder and listed with
its reason in the report; it never enters the dataset. Label problems fail the whole ingest
before anything is written, naming the file: a labels file that does not match its images,
a label outside the classes, one image under two classes, a class the dataset lacks.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from ssl_models.data import FASHION_MNIST_CLASSES, IMAGE_SUFFIXES, DataError, read_idx

Kind = Literal["unlabeled", "labeled"]


@dataclass(frozen=True)
class ImageRules:
    """What an image must be to enter a dataset."""

    channels: Literal[1, 3] = 1
    min_side: int = 8
    max_side: int = 4096

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"


@dataclass
class IngestReport:
    kind: str
    source: str
    dest: str
    added: int = 0
    already_present: int = 0
    duplicates_in_source: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (source file, reason)
    classes: list[str] = field(default_factory=list)
    total: int = 0  # images in the dataset after the ingest

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BadImage(Exception):
    """A source file that cannot enter the dataset; the message is the reason."""


@dataclass(frozen=True)
class SourceItem:
    name: str  # where it came from, for messages and the report
    read: Callable[[], bytes | np.ndarray]  # encoded bytes, or pixels already decoded (IDX)
    label: str | None


def decode(data: bytes | np.ndarray, rules: ImageRules) -> np.ndarray:
    """Pixels (H, W) or (H, W, 3) in the dataset's mode; ``BadImage`` says why not."""
    if isinstance(data, np.ndarray):
        array = data
    else:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                if img.mode not in {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I", "CMYK", "YCbCr"}:
                    raise BadImage(f"unsupported image mode {img.mode}")
                array = np.asarray(img.convert(rules.mode), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise BadImage(f"cannot decode image ({type(e).__name__}: {e})") from e
    height, width = array.shape[:2]
    if min(height, width) < rules.min_side or max(height, width) > rules.max_side:
        raise BadImage(f"size {width}x{height} outside {rules.min_side}-{rules.max_side} px per side")
    return array


def image_id(array: np.ndarray) -> str:
    h = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:32]


def _write_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _read_file(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def folder_items(root: Path, kind: Kind) -> list[SourceItem]:
    """Every image file below ``root``; for ``labeled``, the class is the first sub-folder."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if kind == "labeled":
        loose = [p for p in files if p.parent == root]
        if loose:
            raise DataError(f"{loose[0]}: a labeled folder holds images in one sub-folder per class")
    if not files:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [
        SourceItem(str(p), _read_file(p), p.relative_to(root).parts[0] if kind == "labeled" else None)
        for p in files
    ]


def idx_items(
    images_path: Path, labels_path: Path | None, classes: tuple[str, ...] = FASHION_MNIST_CLASSES
) -> list[SourceItem]:
    """Images of an IDX file, with class names from an IDX labels file when given."""
    images = read_idx(images_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected images of shape (N, H, W), got {images.shape}")
    labels: list[str | None] = [None] * len(images)
    if labels_path is not None:
        raw = read_idx(labels_path)
        if raw.ndim != 1:
            raise DataError(f"{labels_path}: expected labels of shape (N,), got {raw.shape}")
        if len(raw) != len(images):
            raise DataError(f"{labels_path}: {len(raw)} labels for {len(images)} images in {images_path}")
        if len(raw) and raw.max() >= len(classes):
            raise DataError(f"{labels_path}: label {raw.max()} outside 0-{len(classes) - 1}")
        labels = [class_folder(classes[i]) for i in raw]
    return [
        SourceItem(f"{images_path}[{i}]", functools.partial(np.asarray, array), label)
        for i, (array, label) in enumerate(zip(images, labels, strict=True))
    ]


def class_folder(name: str) -> str:
    """A class name as one folder name: Fashion-MNIST's "T-shirt/top" becomes "T-shirt_top"."""
    return name.replace("/", "_").replace("\\", "_").lstrip(".") or "_"


def existing_ids(dest: Path, kind: Kind) -> dict[str, str | None]:
    """The ids already in a dataset folder, with their class."""
    pattern = "*/*.png" if kind == "labeled" else "*.png"
    return {p.stem: (p.parent.name if kind == "labeled" else None) for p in dest.glob(pattern)}


def ingest(
    items: Iterable[SourceItem],
    kind: Kind,
    dest: str | Path,
    quarantine: str | Path,
    rules: ImageRules = ImageRules(),
    allow_new_classes: bool = False,
    source: str = "",
    workers: int = 8,
) -> IngestReport:
    """Validate ``items`` and add the good ones to the dataset folder ``dest``."""
    dest, quarantine = Path(dest), Path(quarantine)
    items = list(items)
    report = IngestReport(kind=kind, source=source, dest=str(dest))
    present = existing_ids(dest, kind)
    known_classes = sorted({c for c in present.values() if c is not None})
    if kind == "labeled":
        if any(item.label is None for item in items):
            raise DataError(f"{source}: labeled data needs a class for every image")
        new = sorted({str(item.label) for item in items} - set(known_classes))
        if new and known_classes and not allow_new_classes:
            raise DataError(
                f"{source}: class {new[0]!r} is not one of the dataset's classes {known_classes}"
                " (allow_new_classes to add it)"
            )

    def check(item: SourceItem) -> tuple[SourceItem, np.ndarray | None, str]:
        try:
            array = decode(item.read(), rules)
            return item, array, image_id(array)
        except BadImage as e:
            return item, None, str(e)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        checked = list(pool.map(check, items))

    chosen: dict[str, tuple[SourceItem, np.ndarray]] = {}
    bad: list[tuple[SourceItem, str]] = []
    for item, array, identity in checked:
        if array is None:
            bad.append((item, identity))  # identity holds the reason
        elif identity in chosen:
            first = chosen[identity][0]
            if first.label != item.label:
                raise DataError(f"{item.name}: the same image as {first.name} under another class")
            report.duplicates_in_source += 1
        elif identity in present:
            if present[identity] != item.label:
                raise DataError(
                    f"{item.name}: the same image is already in the dataset as class {present[identity]!r}"
                )
            report.already_present += 1
        else:
            chosen[identity] = (item, array)

    for item, reason in bad:
        _quarantine(item, reason, quarantine)
        report.quarantined.append((item.name, reason))
    for identity, (item, array) in chosen.items():
        folder = dest / item.label if item.label is not None else dest
        _write_png(array, folder / f"{identity}.png")
    report.added = len(chosen)
    report.total = len(present) + len(chosen)
    report.classes = sorted(set(known_classes) | {str(i.label) for i, _ in chosen.values() if i.label})
    return report


def _quarantine(item: SourceItem, reason: str, quarantine: Path) -> None:
    quarantine.mkdir(parents=True, exist_ok=True)
    safe = item.name.replace(os.sep, "__").replace(":", "_")[-200:]
    data = item.read()
    if isinstance(data, np.ndarray):
        np.save(quarantine / f"{safe}.npy", data)
    else:
        (quarantine / safe).write_bytes(data)
    (quarantine / f"{safe}.reason.txt").write_text(reason + "\n")
