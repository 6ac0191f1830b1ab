"""Prefect: how the pipeline's stages run. Cache keys, persisted results, retries on transient
failures, timeouts, the new-data event, and the deployment's schedule and trigger.

A stage's cache key names exactly what its result depends on: the data's content hashes, the
config sections the stage reads, and the code (a hash of ``ssl_models``, ``tasks`` and the
flow's sources). Results are persisted in the workspace by default, or in S3
(``orchestration.results``), so a rerun in another process skips finished stages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import socket
from pathlib import Path
from typing import Any

from botocore.exceptions import ConnectionClosedError, EndpointConnectionError
from mlflow.exceptions import MlflowException
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.events import DeploymentEventTrigger, emit_event
from prefect.events.worker import EventsWorker
from prefect.schedules import Cron, Schedule
from ray.exceptions import GetTimeoutError, RaySystemError
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import Timeout as RequestsTimeout

from tasks.config import PipelineConfig
from tasks.watch import Arrival

# What a stage runs: the model code, the tasks, and the flow that strings them together.
CODE = ("ssl_models", "tasks", "flows/pipeline.py")
DATA_ARRIVED = "ssl-pipeline.data.arrived"  # the event: new unlabeled images
UNLABELED = "ssl-pipeline.unlabeled"  # resource ids: <UNLABELED>.watch, <UNLABELED>.dataset

TRANSIENT = (
    ConnectionError,  # ConnectionRefusedError, ConnectionResetError, ...; ours name the setting
    TimeoutError,
    socket.gaierror,
    RequestsConnectionError,
    RequestsTimeout,
    EndpointConnectionError,
    ConnectionClosedError,
    RaySystemError,
    GetTimeoutError,
)


@functools.cache
def code_version() -> str:
    """A hash of the code stages run (``CODE``): a change there invalidates every cached stage."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for part in CODE:
        paths = [root / part] if part.endswith(".py") else sorted((root / part).rglob("*.py"))
        for path in paths:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stage_key(stage: str, *parts: object) -> str:
    """``<stage>-<hash>`` of the code version and ``parts`` (digests, config sections, URIs)."""
    payload = json.dumps([stage, code_version(), *parts], sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:24]}"


def results_storage(cfg: PipelineConfig) -> Path | str:
    """Where Prefect persists stage results: a folder, or a saved S3 filesystem block's slug."""
    location = cfg.orchestration.results
    if not location:
        return (cfg.workspace_path / "prefect" / "results").resolve()
    if not location.startswith("s3://"):
        return Path(location).resolve()
    from prefect.filesystems import RemoteFileSystem

    endpoint = cfg.orchestration.results_endpoint_url
    settings = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    name = "ssl-pipeline-results-" + hashlib.sha256(f"{location} {endpoint}".encode()).hexdigest()[:10]
    # Credentials stay in the environment (s3fs reads AWS_*); the block holds only where.
    RemoteFileSystem(basepath=location, settings=settings).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def is_transient(error: BaseException) -> bool:
    """A failure worth retrying: a server or store that did not answer, not a bad input."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, TRANSIENT):
            return True
        # The MLflow client wraps connection errors in its own exception, by message only.
        if isinstance(seen, MlflowException) and "failed with exception" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry only what ``is_transient`` calls transient."""
    try:
        state.result()
    except BaseException as e:  # the state's own exception, raised again by result()
        return is_transient(e)
    return False


def stage_options(
    cfg: PipelineConfig, stage: str, cache_key: str | None = None, refresh: bool = False
) -> dict[str, Any]:
    """``Task.with_options`` for a stage: retries, its timeout, and its cache when it has a key."""
    o = cfg.orchestration
    options: dict[str, Any] = {
        "retries": o.retries,
        "retry_delay_seconds": o.retry_delay_seconds,
        "retry_condition_fn": retry_transient,
        "timeout_seconds": getattr(o.timeouts, stage),
    }
    if cache_key is None or not o.cache:
        return {**options, "cache_policy": NO_CACHE}
    return {
        **options,
        "cache_policy": CachePolicy.from_cache_key_fn(lambda *_: cache_key),
        "persist_result": True,
        "result_storage": results_storage(cfg),
        "refresh_cache": refresh,
    }


def emit_data_arrived(arrival: Arrival, source: str, flush: bool = False) -> None:
    """The custom event a deployment trigger starts retraining on (``source``: watch | dataset).

    ``flush`` waits until it is sent: a short-lived process (``data ingest``) exits right after.
    """
    emit_event(
        event=DATA_ARRIVED,
        resource={"prefect.resource.id": f"{UNLABELED}.{source}", "ssl-pipeline.location": arrival.location},
        payload={"new_images": arrival.new_images, "images": arrival.images},
    )
    if flush:
        EventsWorker.drain_all(timeout=30)


def retraining_schedules(cfg: PipelineConfig) -> list[Schedule]:
    if not cfg.orchestration.cron:
        return []
    return [
        Cron(cfg.orchestration.cron, timezone=cfg.orchestration.timezone, parameters={"reason": "schedule"})
    ]


def retraining_triggers() -> list[DeploymentEventTrigger]:
    """A run for each new-data event, whoever emitted it (the watch, or ``data ingest``)."""
    return [
        DeploymentEventTrigger(
            name="new unlabeled images",
            expect={DATA_ARRIVED},
            match={"prefect.resource.id": f"{UNLABELED}.*"},
            parameters={"reason": "new-data"},
        )
    ]
