"""Folders of real JPEG photographs for scale benchmarks and tests: random crops of the two photos
scikit-learn ships (``china.jpg``, ``flower.jpg``, 427 x 640), sides 96-384 px, flipped, rescaled
and saved at JPEG qualities 70-95, so every file is a different real photo crop.

    .venv/bin/python -m bench.photos FOLDER COUNT [--classes N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image


@cache
def _photos() -> tuple[Image.Image, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(Image.fromarray(image) for image in load_sample_images().images)


def photo(index: int, seed: int = 0, min_side: int = 96, max_side: int = 384) -> Image.Image:
    """The ``index``-th crop of the ``seed``-th series: the same arguments give the same image."""
    rng = np.random.default_rng([seed, index])
    source = _photos()[index % 2]
    width, height = source.size
    side = int(rng.integers(min_side, min(max_side, height) + 1))
    aspect = float(rng.uniform(0.75, 4 / 3))
    w, h = min(width, int(side * aspect)), side
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    crop = source.crop((left, top, left + w, top + h))
    scale = float(rng.uniform(0.6, 1.0))
    size = (max(min_side, int(w * scale)), max(min_side, int(h * scale)))
    crop = crop.resize((min(size[0], max_side), min(size[1], max_side)), Image.Resampling.BILINEAR)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def _write(args: tuple[Path, int, int, int, int]) -> int:
    root, start, stop, seed, classes = args
    written = 0
    for index in range(start, stop):
        rng = np.random.default_rng([seed, index, 1])
        folder = root / f"class_{index % classes:04d}" if classes else root
        path = folder / f"{index:08d}.jpg"
        photo(index, seed).save(path, format="JPEG", quality=int(rng.integers(70, 96)))
        written += path.stat().st_size
    return written


def write_photo_folder(root: Path, count: int, seed: int = 0, classes: int = 0, start: int = 0) -> int:
    """``count`` JPEG photos in ``root`` (spread over ``class_K`` sub-folders when ``classes``); their bytes.

    ``start`` numbers the files from there, so a later call adds new photos beside earlier ones.
    """
    for folder in [root / f"class_{k:04d}" for k in range(classes)] or [root]:
        folder.mkdir(parents=True, exist_ok=True)
    chunk = 1000
    jobs = [
        (root, first, min(first + chunk, start + count), seed, classes)
        for first in range(start, start + count, chunk)
    ]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        return sum(pool.map(_write, jobs))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("count", type=int)
    parser.add_argument("--classes", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = write_photo_folder(args.folder, args.count, args.seed, args.classes)
    print(f"{args.count} photos, {size / 1e6:.1f} MB in {args.folder}")


if __name__ == "__main__":
    main()
