"""The pipeline's steps as DVC stages (``dvc.yaml``): the same task functions as the Prefect
flow, each stage reading the previous one's JSON manifest from ``<workspace>/stages/``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig
from tasks.data import PreparedData, ingest_and_prepare, prepare_data
from tasks.pretrain import PretrainOutput, pretrain_encoder
from tasks.sweep import run_sweep
from tasks.versioning import recorded_versions

STAGES = ("prepare", "pretrain", "sweep")


def manifest_path(cfg: PipelineConfig, stage: str) -> Path:
    return cfg.workspace_path / "stages" / f"{stage}.json"


def _write(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _read(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    path = manifest_path(cfg, stage)
    if not path.exists():
        raise FileNotFoundError(f"{path}: run the '{stage}' stage first (dvc repro runs them in order)")
    return json.loads(path.read_text())


def run_stage(stage: str, cfg: PipelineConfig) -> Path:
    """Run one stage and write its manifest; returns the manifest's path."""
    if stage == "prepare":
        # `dvc repro` holds the repository's lock: read the versions the .dvc files record
        # (`ssl-pipeline data ingest` or a flow run made them) instead of running DVC again;
        # with none recorded, ingest the configured sources into the folders (not versioned).
        versions = recorded_versions(cfg)
        payload: Any = asdict(prepare_data(cfg, versions) if versions else ingest_and_prepare(cfg))
    elif stage == "pretrain":
        payload = asdict(pretrain_encoder(cfg, PreparedData.from_dict(_read(cfg, "prepare"))))
    elif stage == "sweep":
        data = PreparedData.from_dict(_read(cfg, "prepare"))
        pretrained = PretrainOutput(**_read(cfg, "pretrain"))
        payload = run_sweep(cfg, data, pretrained.encoder_path).metrics()
    else:
        raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
    path = manifest_path(cfg, stage)
    _write(path, payload)
    return path
