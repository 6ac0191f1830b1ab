"""Scheduled and triggered retraining: the ``retrain`` flow a deployment runs, and ``serve``.

``serve`` registers the deployment with the config's cron schedule and a trigger on the
new-data event, starts a thread that polls ``orchestration.watch`` (a folder or an S3 prefix)
and emits that event when enough new images arrived, and runs the flow runs the API hands it.
Scheduled and triggered runs pass ``reason`` so that a run finding no new data since the
champion was trained ends after the data step, saying so.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.pipeline import ssl_pipeline
from tasks import orchestration
from tasks.config import PipelineConfig, load_config
from tasks.watch import Watch

REASONS = ("manual", "schedule", "new-data")
log = logging.getLogger("ssl_pipeline.serve")


@flow(name="retrain")
def retrain(
    config: str | None = None,
    profile: str = "default",
    overrides: list[str] | None = None,
    reason: str = "manual",
) -> dict[str, Any]:
    """The whole pipeline from a params file; ``schedule`` and ``new-data`` runs end early when
    the champion was trained on the current data. Returns what happened, as JSON."""
    if reason not in REASONS:
        raise ValueError(f"reason: expected one of {list(REASONS)}, got {reason!r}")
    cfg = load_config(config, profile, overrides or [])
    result = ssl_pipeline(cfg, only_if_new_data=reason != "manual")
    summary: dict[str, Any] = {"reason": reason, "data_sha256": result.data.digests()}
    if result.skipped or result.promotion is None:
        get_run_logger().info("Ended early (%s run): %s", reason, result.skipped)
        return {**summary, "skipped": result.skipped}
    get_run_logger().info(
        "Registered model %r: %s", cfg.tracking.registered_model, result.promotion.summary()
    )
    return {
        **summary,
        "model_version": result.promotion.version,
        "registered": result.promotion.registered,
        "promotion": result.promotion.decision.outcome,
        "promotion_reason": result.promotion.decision.reason,
        "champion_version": result.promotion.champion,
    }


def deployment(cfg: PipelineConfig, config: str, profile: str, overrides: list[str]) -> RunnerDeployment:
    """The ``retrain`` deployment: the config's cron schedule and the new-data trigger."""
    return retrain.to_deployment(  # type: ignore[return-value]
        name=cfg.orchestration.deployment,
        schedules=orchestration.retraining_schedules(cfg),
        triggers=orchestration.retraining_triggers(),  # type: ignore[arg-type]
        parameters={"config": str(Path(config).resolve()), "profile": profile, "overrides": overrides},
        entrypoint_type=EntrypointType.MODULE_PATH,  # runs wherever the package is installed
        description="Retrain ssl-pipeline: on a schedule, on new unlabeled images, or by hand.",
    )


def _poll(watch: Watch, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            if arrival := watch.poll():
                log.info(
                    "%d new images in %s: emitting %s",
                    arrival.new_images,
                    arrival.location,
                    orchestration.DATA_ARRIVED,
                )
                orchestration.emit_data_arrived(arrival, "watch")
        except Exception as e:  # a store that is down now may answer at the next poll
            log.warning("watching %s: %s", watch.location, e)


def start_watching(cfg: PipelineConfig) -> threading.Event | None:
    """Poll ``orchestration.watch`` in a daemon thread; set the returned event to stop it."""
    o = cfg.orchestration
    if not o.watch:
        return None
    # The first poll, one period in, records the images already there, unless an earlier serve
    # recorded a count: then it counts from that.
    watch = Watch(o.watch, cfg.workspace_path / "prefect", o.min_new_images, o.watch_endpoint_url)
    stop = threading.Event()
    threading.Thread(target=_poll, args=(watch, o.poll_seconds, stop), name="watch", daemon=True).start()
    return stop


def serve_retraining(cfg: PipelineConfig, config: str, profile: str, overrides: list[str]) -> None:
    """Serve the deployment in this process until interrupted (what ``ssl-pipeline serve`` runs).
    The deployment and its trigger exist before the watch starts: no event is emitted unheard."""
    retraining = deployment(cfg, config, profile, overrides)
    retraining.apply()
    stop = start_watching(cfg)
    try:
        serve(retraining)
    finally:
        if stop:
            stop.set()
