"""Time to version 60,000 Fashion-MNIST images with DVC, and to add 1,000 more.

Each phase is timed on its own: ingest (decode, validate, write shards of the images as PNGs),
dvc add (hash), push (to a local-folder remote). The second round adds the first 1,000 test
images to the 60,000 training images: only a new shard, its manifest part and its record should
be written, hashed and pushed.

    .venv/bin/python -m bench.data_versioning [--remote DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

from tasks import versioning
from tasks.ingest import ingest
from tasks.sources import idx_items

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).parent / "results" / "data_versioning.json"


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 1)


def version_round(root: Path, items: list, label: str) -> dict[str, object]:  # type: ignore[type-arg]
    report, ingest_s = timed(
        lambda: ingest(iter(items), "unlabeled", root / "data" / "unlabeled", quarantine=root / "quarantine")
    )
    version, add_s = timed(lambda: versioning.track(root, "data/unlabeled"))
    pushed, push_s = timed(lambda: versioning.push(root, "data/unlabeled"))
    row = {
        "round": label,
        "images_in": len(items),
        "added": report.added,
        "dataset_images": report.total,
        "ingest_s": ingest_s,
        "dvc_add_s": add_s,
        "push_s": push_s,
        "files_pushed": pushed,
        "dvc_md5": version.md5,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    train = list(idx_items(FASHION_MNIST / "train-images-idx3-ubyte.gz", None))
    extra = list(idx_items(FASHION_MNIST / "t10k-images-idx3-ubyte.gz", None))[:1000]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        root.mkdir()
        versioning.init(root, str(Path(tmp) / "remote"))
        rows = [
            version_round(root, train, "60,000 training images"),
            version_round(root, extra, "+1,000 test images"),
        ]
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python -m bench.data_versioning",
                "date": date.today().isoformat(),
                "remote": "local folder",
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
