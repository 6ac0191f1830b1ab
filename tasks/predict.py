"""Classify the images of a folder, an S3 prefix or a table with a classifier, streaming to a CSV.

The source is listed lazily and read a batch at a time (``tasks.sources``), so memory holds one
batch whatever the number of images. Each row: the image's path, the class, its probability; an
image that cannot be read or decoded gets its reason in ``error`` instead, and the rest go on.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from ssl_models.classifier import ImageClassifier, decode_image
from tasks.sources import SourceItem

BATCH = 256
COLUMNS = ("path", "class", "probability", "error")


@dataclass
class PredictReport:
    images: int = 0
    classified: int = 0
    failed: int = 0
    skipped: int = 0  # entries of the source that are no image files (listed as such)


def _batches(items: Iterator[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    while batch := list(islice(items, size)):
        yield batch


def predict_to_csv(
    classifier: ImageClassifier,
    items: Iterator[SourceItem],
    out: str | Path,
    s3_client: object | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> PredictReport:
    """Write one row per image of ``items`` to ``out`` (written to a partial file, then renamed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    report = PredictReport()
    mode = "L" if classifier.spec.channels == 1 else "RGB"
    with partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for batch in _batches(items, BATCH):
            good: list[tuple[str, np.ndarray]] = []
            for item in batch:
                if item.skipped:
                    report.skipped += 1
                    continue
                report.images += 1
                try:
                    image = decode_image(item.read(s3_client)).convert(mode)
                except (OSError, ValueError) as e:
                    writer.writerow((item.name, "", "", str(e)))
                    report.failed += 1
                    continue
                good.append((item.name, np.asarray(image)))  # decoded once: pixels to classify
            if good:
                result = classifier.classify([pixels for _, pixels in good])
                for (name, _), label, index, probabilities in zip(
                    good, result.labels, result.class_index, result.probabilities, strict=True
                ):
                    writer.writerow((name, label, f"{probabilities[index]:.6f}", ""))
                report.classified += len(good)
            if on_batch:
                on_batch(len(batch))
    partial.replace(out)
    return report
