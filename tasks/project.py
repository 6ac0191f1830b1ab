"""A project of a user's own: a commented ``params.yaml`` for their images, ``.gitignore``, git and DVC.

The params file is the built-in one (``tasks.config.BUILT_IN_PARAMS``, the checkout's
``params.yaml``) with its data keys set, so every comment stays; the registered model is named
after the project's folder. Without source options the project trains on Fashion-MNIST, the demo.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_models.data import DataError
from tasks import versioning
from tasks.config import BUILT_IN_PARAMS, load_config
from tasks.sources import image_format, source_items

GITIGNORE = ("workspace/", ".venv/", "__pycache__/")
MAX_DETECTED_SIZE = 224  # image_size from the data: the smaller side of an image, at most this


@dataclass(frozen=True)
class Sources:
    """Where a project's images are: each a folder, an s3://bucket/prefix or a .csv/.parquet table."""

    unlabeled: str
    labeled: str
    test: str
    endpoint_url: str | None = None  # an S3-compatible store for s3:// sources

    def resolved(self) -> Sources:
        """Local paths made absolute (the project may live elsewhere); each must exist."""
        located = {}
        for option in ("unlabeled", "labeled", "test"):
            value = getattr(self, option)
            if not value.startswith("s3://"):
                path = Path(value).expanduser().resolve()
                if not path.exists():
                    raise DataError(f"--{option} {value}: no such folder or label table")
                value = str(path)
            located[option] = value
        return Sources(**located, endpoint_url=self.endpoint_url)


@dataclass
class Project:
    folder: Path
    params: Path
    data: dict[str, Any] = field(default_factory=dict)  # the data keys set in params.yaml
    detected: str = ""  # what was read from the data to set channels and image_size
    done: list[str] = field(default_factory=list)  # what was made, in order


def detect_image_format(sources: Sources) -> tuple[int, int, str]:
    """(channels, image_size, what was seen) from the first labeled image: RGB unless it is
    grayscale; its smaller side, at most ``MAX_DETECTED_SIZE``."""
    items = (i for i in source_items(sources.labeled, "labeled", sources.endpoint_url) if not i.skipped)
    item = next(items, None)
    if item is None:
        raise DataError(f"--labeled {sources.labeled}: no images")
    mode, width, height = image_format(item, sources.endpoint_url)
    channels = 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    size = min(width, height, MAX_DETECTED_SIZE)
    return channels, size, f"{item.name}: {width}x{height} {mode}"


def _scalar(value: Any) -> str:
    return json.dumps(value)  # a JSON scalar is a YAML scalar


def set_keys(template: str, section: str, values: dict[str, Any]) -> str:
    """``template`` with each ``section.key: value`` line's value replaced, its comment kept."""
    block = re.search(rf"^{section}:\n((?:[ #].*\n|\n)*)", template, flags=re.M)
    if block is None:
        raise ValueError(f"the params template has no {section!r} section")
    body = block.group(1)
    for key, value in values.items():
        line = re.compile(rf"^(  {key}:)[ ]+[^ #\n]+", flags=re.M)
        body, found = line.subn(lambda m, v=value: f"{m.group(1)} {_scalar(v)}", body, count=1)
        if not found:
            raise ValueError(f"the params template has no {section}.{key}")
    return template[: block.start(1)] + body + template[block.end(1) :]


def project_params(name: str, sources: Sources | None, channels: int, image_size: int) -> str:
    text = BUILT_IN_PARAMS.read_text()
    data: dict[str, Any] = {"channels": channels, "image_size": image_size}
    if sources is not None:
        data = {
            "source": "folder",
            "unlabeled_dir": sources.unlabeled,
            "labeled_dir": sources.labeled,
            "test_dir": sources.test,
            "source_endpoint_url": sources.endpoint_url,
            **data,
        }
    text = set_keys(text, "data", data)
    return set_keys(text, "tracking", {"registered_model": name})


def _in_git_work_tree(folder: Path) -> bool:
    shown = subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "--is-inside-work-tree"], capture_output=True, text=True
    )
    return shown.returncode == 0 and shown.stdout.strip() == "true"


def make_project(
    folder: Path,
    sources: Sources | None = None,
    channels: int | None = None,
    image_size: int | None = None,
) -> Project:
    """Make ``folder`` a project (made if missing; an existing ``params.yaml`` is never overwritten)."""
    folder = folder.expanduser().resolve()
    params = folder / "params.yaml"
    if params.exists():
        raise FileExistsError(f"{params}: the folder is a project already; edit its params.yaml")
    project = Project(folder, params)
    if sources is not None:
        sources = sources.resolved()
        if channels is None or image_size is None:
            seen_channels, seen_size, project.detected = detect_image_format(sources)
            channels = seen_channels if channels is None else channels
            image_size = seen_size if image_size is None else image_size
    defaults = load_config(BUILT_IN_PARAMS).data
    channels = defaults.channels if channels is None else channels
    image_size = defaults.image_size if image_size is None else image_size
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name).strip("-.") or "ssl-pipeline"
    text = project_params(name, sources, channels, image_size)
    partial = params.with_suffix(".yaml.partial")
    partial.write_text(text)
    try:
        cfg = load_config(partial)  # what the project's commands will read: valid before it is written
    except Exception:
        partial.unlink()
        raise
    partial.replace(params)
    project.data = cfg.data.model_dump(include={"source", "unlabeled_dir", "labeled_dir", "test_dir"})
    project.data.update(channels=channels, image_size=image_size)
    project.done.append("params.yaml")
    gitignore = folder / ".gitignore"
    present = gitignore.read_text().splitlines() if gitignore.exists() else []
    missing = [line for line in GITIGNORE if line not in present]
    if missing:
        with gitignore.open("a") as f:
            f.write("".join(f"{line}\n" for line in missing))
        project.done.append(".gitignore")
    if shutil.which("git") and not _in_git_work_tree(folder):
        subprocess.run(["git", "init", "--quiet", str(folder)], check=True)
        project.done.append("git")
    if not (folder / ".dvc").is_dir():
        versioning.init(folder, str(folder / cfg.workspace / "dvc-remote"))
        project.done.append("DVC (remote: workspace/dvc-remote)")
    return project
