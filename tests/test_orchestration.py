"""Prefect orchestration: transient-failure retries, cache keys, the watch, the registry
transaction, and the deployment's schedule and trigger (Prefect's test harness: a real API on a
temporary database, no waiting for wall-clock time)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from mlflow.exceptions import MlflowException
from PIL import Image

from ssl_models.data import DataError
from tasks import orchestration, registry
from tasks.config import PipelineConfig
from tasks.watch import Watch, count_images
from tests.test_promotion import evaluation, new_challenger, snapshot


@pytest.fixture(scope="module")
def prefect_api() -> Any:
    """A real Prefect API on a temporary database for this module's tests; its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def test_only_transient_failures_are_retried() -> None:
    assert orchestration.is_transient(ConnectionRefusedError("mlflow server down"))
    assert orchestration.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:8333"))
    wrapped = MlflowException("API request to http://127.0.0.1:5000/api failed with exception ...")
    assert orchestration.is_transient(wrapped)
    try:
        try:
            raise TimeoutError("S3 read timed out")
        except TimeoutError as e:
            raise RuntimeError("checkpoint upload failed") from e
    except RuntimeError as chained:
        assert orchestration.is_transient(chained)
    for permanent in (DataError("a.png: cannot decode"), ValueError("pretrain.lr"), FileNotFoundError("x")):
        assert not orchestration.is_transient(permanent)
    assert not orchestration.is_transient(MlflowException("RESOURCE_DOES_NOT_EXIST: no such run"))


def test_stage_keys_follow_data_config_and_code(monkeypatch: pytest.MonkeyPatch) -> None:
    key = orchestration.stage_key("sweep", {"labeled": "a"}, "cfg1")
    assert key == orchestration.stage_key("sweep", {"labeled": "a"}, "cfg1")
    assert key.startswith("sweep-")
    assert key != orchestration.stage_key("sweep", {"labeled": "b"}, "cfg1")
    assert key != orchestration.stage_key("sweep", {"labeled": "a"}, "cfg2")
    assert key != orchestration.stage_key("pretraining", {"labeled": "a"}, "cfg1")
    monkeypatch.setattr(orchestration, "code_version", lambda: "changed")
    assert key != orchestration.stage_key("sweep", {"labeled": "a"}, "cfg1")


def test_stage_options_cache_only_with_a_key_and_persist_in_the_workspace(tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate(
        {"workspace": str(tmp_path / "ws"), "orchestration": {"retries": 3, "timeouts": {"sweep": 60}}}
    )
    options = orchestration.stage_options(cfg, "sweep", "sweep-abc")
    assert options["retries"] == 3 and options["timeout_seconds"] == 60
    assert options["result_storage"] == (tmp_path / "ws" / "prefect" / "results").resolve()
    assert options["cache_policy"].compute_key(None, {}, {}) == "sweep-abc"
    assert "result_storage" not in orchestration.stage_options(cfg, "promotion")
    off = cfg.model_copy(update={"orchestration": cfg.orchestration.model_copy(update={"cache": False})})
    assert "result_storage" not in orchestration.stage_options(off, "sweep", "sweep-abc")


def _pngs(folder: Path, start: int, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        Image.new("L", (28, 28), color=i % 256).save(folder / f"{i:05d}.png")


def test_the_watch_reports_new_images_once_enough_arrived(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    _pngs(folder, 0, 10)
    (folder / "notes.txt").write_text("not an image")
    assert count_images(str(folder)) == 10
    watch = Watch(str(folder), tmp_path / "state", min_new=5)
    assert watch.poll() is None  # the first look records what is already there
    _pngs(folder / "day2", 10, 4)
    assert watch.poll() is None  # 4 < 5
    _pngs(folder / "day2", 14, 3)
    arrival = watch.poll()
    assert arrival is not None and (arrival.new_images, arrival.images) == (7, 17)
    assert watch.poll() is None  # reported: counted from 17 now
    # A new process (serve restarted) counts from the recorded state, not from scratch.
    _pngs(folder, 17, 5)
    again = Watch(str(folder), tmp_path / "state", min_new=5).poll()
    assert again is not None and again.new_images == 5
    with pytest.raises(FileNotFoundError, match=r"orchestration\.watch"):
        count_images(str(tmp_path / "missing"))


def test_a_failing_gate_rolls_back_the_registration(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow

    from flows.pipeline import register_and_gate

    cfg = PipelineConfig.model_validate(
        {"workspace": str(tmp_path / "ws"), "tracking": {"registered_model": "fashion"}}
    )
    assert new_challenger(cfg, evaluation(0.80)).version == "1"
    before = snapshot(cfg)
    real_report = registry._log_report

    def report_fails(*args: Any) -> None:
        raise RuntimeError("report upload failed")

    monkeypatch.setattr(registry, "_log_report", report_fails)
    client = registry.client_for(cfg)
    run = client.create_run(client.get_experiment_by_name("gate").experiment_id)

    @flow
    def promote_in_a_transaction() -> registry.PromotionOutcome:
        return register_and_gate(
            cfg, f"runs:/{run.info.run_id}/model", run.info.run_id, {}, evaluation(0.9), "w2"
        )

    with pytest.raises(RuntimeError, match="report upload failed"):
        promote_in_a_transaction()
    assert snapshot(cfg) == before  # version 2 was created, then undone by the rollback hook
    monkeypatch.setattr(registry, "_log_report", real_report)
    outcome = promote_in_a_transaction()
    assert (outcome.version, outcome.decision.outcome, outcome.champion) == ("3", "promoted", "3")


def test_the_deployment_schedule_and_trigger_come_from_the_config(prefect_api: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.deployment import deployment

    cfg = PipelineConfig.model_validate(
        {"workspace": str(tmp_path / "ws"), "orchestration": {"cron": "30 2 * * 1", "timezone": "UTC"}}
    )
    deployment_id = deployment(cfg, "params.yaml", "smoke", ["pretrain.epochs=1"]).apply()
    with get_client(sync_client=True) as client:
        created = client.read_deployment(deployment_id)
        assert [s.schedule.cron for s in created.schedules] == ["30 2 * * 1"]  # type: ignore[union-attr]
        assert created.parameters["profile"] == "smoke"
        assert created.parameters["overrides"] == ["pretrain.epochs=1"]
        # Prefect's own scheduling (what its scheduler service runs), from a fixed start time.
        start = datetime.datetime(2026, 11, 23, 0, 0, tzinfo=datetime.UTC)  # a Monday
        client._client.post(
            f"/deployments/{deployment_id}/schedule", json={"start_time": start.isoformat(), "max_runs": 3}
        ).raise_for_status()
        runs = client.read_flow_runs()
        scheduled = sorted(
            (r for r in runs if r.deployment_id == deployment_id), key=lambda r: r.expected_start_time
        )
        assert [r.expected_start_time.isoformat() for r in scheduled] == [
            "2026-11-23T02:30:00+00:00",
            "2026-11-30T02:30:00+00:00",
            "2026-12-07T02:30:00+00:00",
        ]
        assert all(r.parameters["reason"] == "schedule" for r in scheduled)
        automations = client.read_automations_by_name("new unlabeled images")
        assert automations, "the deployment's trigger was not created"
        trigger = automations[0].trigger
        assert trigger.expect == {orchestration.DATA_ARRIVED}  # type: ignore[union-attr]
        action = automations[0].actions[0]
        assert action.parameters == {"reason": "new-data"}  # type: ignore[union-attr]
