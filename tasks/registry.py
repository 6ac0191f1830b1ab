"""MLflow Model Registry: register a logged model and give it the ``champion`` alias."""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.config import PipelineConfig
from tasks.tracking import client_for

CHAMPION = "champion"


def register_model(cfg: PipelineConfig, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """A new version of the configured registered model; returns the version number."""
    client = client_for(cfg)
    name = cfg.tracking.registered_model
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Encoder + linear head from ssl-pipeline")
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags)
    return str(version.version)


def champion_version(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def alias_champion_if_none(cfg: PipelineConfig, version: str) -> str:
    """Give ``version`` the champion alias when no version holds it; returns the champion."""
    client = client_for(cfg)
    name = cfg.tracking.registered_model
    current = champion_version(client, name)
    if current is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return version
    return current
