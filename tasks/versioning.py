"""Version dataset folders with DVC: track, push, pull, status, and the history of versions.

A dataset version is the DVC hash of its folder (the md5 of DVC's directory manifest), read
from the folder's ``.dvc`` file; git history of that file is the list of versions. The
remote is configured in ``.dvc/config`` (URL and ``endpointurl`` only); credentials come
from the environment or ``.dvc/config.local`` and are never written by this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dvc.api
import yaml
from dvc.exceptions import DvcException
from dvc.repo import Repo

from tasks.config import PipelineConfig
from tasks.data import PreparedData, dataset_folders


class VersioningError(RuntimeError):
    """A DVC operation failed; the message names the dataset and the remote."""


@dataclass(frozen=True)
class DatasetVersion:
    path: str  # the dataset folder, relative to the repository root
    md5: str  # DVC's hash of the folder: the dataset version
    files: int
    size: int  # bytes

    @property
    def short(self) -> str:
        return self.md5.removesuffix(".dir")[:12]


@contextlib.contextmanager
def _quiet_dvc() -> Iterator[None]:
    """DVC's INFO lines ("git add ..." hints, "Initialized DVC repository"): the callers say what to do."""
    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        dvc_logger.setLevel(level)


@contextlib.contextmanager
def open_repo(root: str | Path) -> Iterator[Repo]:
    """The DVC repository at ``root``; DVC resolves paths from the working directory, so we enter it."""
    root = Path(root).resolve()
    if not (root / ".dvc").is_dir():
        raise VersioningError(f"{root}: not a DVC repository (ssl-pipeline data init, or dvc init)")
    with _quiet_dvc(), contextlib.chdir(root), Repo(str(root)) as repo:
        yield repo


def init(root: str | Path, remote_url: str, endpoint_url: str | None = None, name: str = "storage") -> None:
    """``dvc init`` (inside git if ``root`` is a git work tree) and the default remote.

    A local remote is written relative to ``.dvc/`` (where DVC resolves it), so the committed
    config holds no machine path. Nothing is rewritten when the remote is already set.
    """
    root = Path(root).resolve()
    if not (root / ".dvc").is_dir():
        with _quiet_dvc():
            Repo.init(str(root), no_scm=not (root / ".git").exists())
    local = "://" not in remote_url
    if local:  # DVC reads a path relative to the working directory (root) and stores it relative to .dvc/
        remote_url = os.path.relpath(Path(remote_url).resolve(), root)
    wanted = {"url": remote_url, **({"endpointurl": endpoint_url} if endpoint_url else {})}
    with open_repo(root) as repo:
        current = dict(repo.config["remote"].get(name, {}))
        if local and "url" in current:  # loaded as an absolute path
            current["url"] = os.path.relpath(current["url"], root)
        if repo.config["core"].get("remote") == name and all(current.get(k) == v for k, v in wanted.items()):
            return
        with repo.config.edit() as conf:
            conf["core"]["remote"] = name
            conf["remote"][name] = {**conf["remote"].get(name, {}), **wanted}


def _dvc_file(root: Path, path: str | Path) -> Path:
    return root / f"{Path(path)}.dvc"


def _parse(path: str, text: str) -> DatasetVersion:
    out = yaml.safe_load(text)["outs"][0]
    return DatasetVersion(
        path=path, md5=out["md5"], files=int(out.get("nfiles", 0)), size=int(out.get("size", 0))
    )


def current_version(root: str | Path, path: str | Path) -> DatasetVersion | None:
    """The version recorded in ``path.dvc`` (what was last tracked), or None if never tracked."""
    dvc_file = _dvc_file(Path(root), path)
    return _parse(str(path), dvc_file.read_text()) if dvc_file.exists() else None


def track(root: str | Path, path: str | Path) -> DatasetVersion:
    """``dvc add`` the folder; unchanged files are not re-hashed (DVC's state cache)."""
    with open_repo(root) as repo:
        try:
            repo.add(str(path))
        except DvcException as e:
            raise VersioningError(f"{path}: dvc add failed ({e})") from e
    version = current_version(root, path)
    assert version is not None
    return version


def _remote_name(repo: Repo) -> str:
    name = repo.config["core"].get("remote")
    if not name:
        raise VersioningError("no default DVC remote (ssl-pipeline data init --remote URL)")
    return str(name)


def push(root: str | Path, path: str | Path) -> int:
    """Upload what the remote lacks of the tracked folder; returns the number of files sent."""
    with open_repo(root) as repo:
        remote = _remote_name(repo)
        try:
            return int(repo.push(targets=[str(_dvc_file(Path("."), path))]))
        except Exception as e:  # s3fs hands botocore's connection errors through unwrapped
            url = repo.config["remote"][remote].get("url")
            raise VersioningError(f"{path}: push to remote {remote!r} ({url}) failed: {e}") from e


def pull(root: str | Path, path: str | Path) -> None:
    """Download the tracked version of the folder from the remote into the workspace."""
    with open_repo(root) as repo:
        remote = _remote_name(repo)
        try:
            repo.pull(targets=[str(_dvc_file(Path("."), path))])
        except Exception as e:
            url = repo.config["remote"][remote].get("url")
            raise VersioningError(f"{path}: pull from remote {remote!r} ({url}) failed: {e}") from e


def status(root: str | Path, path: str | Path, cloud: bool = False) -> dict[str, Any]:
    """What changed in the folder since it was tracked (and, with ``cloud``, what the remote lacks).

    Empty when the workspace, the cache (and the remote) agree.
    """
    with open_repo(root) as repo:
        target = str(_dvc_file(Path("."), path))
        result: dict[str, Any] = dict(repo.status(targets=[target]))
        if cloud:
            result.update({f"remote: {k}": v for k, v in repo.status(targets=[target], cloud=True).items()})
        return result


def versions(root: str | Path, path: str | Path) -> list[tuple[str, str, DatasetVersion]]:
    """(commit, date, version) for every commit that changed ``path.dvc``, newest first."""
    root = Path(root)
    dvc_file = f"{Path(path)}.dvc"
    log = subprocess.run(
        ["git", "log", "--format=%H %cI", "--", dvc_file],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if log.returncode != 0:
        raise VersioningError(f"{root}: git log failed ({log.stderr.strip()})")
    history = []
    for line in log.stdout.splitlines():
        commit, date = line.split(" ", 1)
        shown = subprocess.run(
            ["git", "show", f"{commit}:{dvc_file}"], cwd=root, capture_output=True, text=True, check=False
        )
        if shown.returncode == 0:
            history.append((commit, date, _parse(str(path), shown.stdout)))
    return history


def version_datasets(cfg: PipelineConfig) -> dict[str, str]:
    """Track every dataset folder with DVC (and push it); returns dataset name -> DVC hash."""
    d = cfg.data.dvc
    init(d.root, d.remote or str(cfg.workspace_path / "dvc-remote"), d.endpoint_url)
    versions = {}
    for name, folder in dataset_folders(cfg).items():
        versions[name] = track(d.root, folder).md5
        if d.push:
            push(d.root, folder)
    return versions


def recorded_versions(cfg: PipelineConfig) -> dict[str, str] | None:
    """The DVC hashes in the datasets' ``.dvc`` files, without running DVC (so inside ``dvc repro``
    too); None unless every dataset folder is tracked and present."""
    root = Path(cfg.data.dvc.root)
    folders = dataset_folders(cfg)
    versions = {name: current_version(root, folder) for name, folder in folders.items()}
    present = all((root / folder).is_dir() for folder in folders.values())
    if not cfg.data.dvc.enabled or not present or any(v is None for v in versions.values()):
        return None
    return {name: v.md5 for name, v in versions.items() if v is not None}


def with_remote_shards(cfg: PipelineConfig, prepared: PreparedData) -> PreparedData:
    """The datasets with the DVC remote's URL of each shard (``s3://...`` for an S3 remote): what
    runs read with ``data.streaming.shards_from: remote``, so workers fetch the very objects of
    the version, and nothing of the dataset passes through this machine."""
    root = Path(cfg.data.dvc.root).resolve()
    refs = []
    for ref in prepared.refs():
        folder = Path(ref.path).resolve().relative_to(root)
        try:
            urls = tuple(dvc.api.get_url(str(folder / shard), repo=str(root)) for shard in ref.shards)
        except DvcException as e:
            raise VersioningError(f"{folder}: cannot locate its shards in the DVC remote ({e})") from e
        refs.append(replace(ref, shard_uris=urls))
    return replace(prepared, unlabeled=refs[0], labeled=refs[1], test=refs[2])
