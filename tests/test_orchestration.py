"""Prefect orchestration: transient-failure retries, cache keys, the watch, the registry
transaction, and the deployment's schedule and trigger (Prefect's test harness: a real API on a
temporary database, no waiting for wall-clock time)."""

from __future__ import annotations

import datetime
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from mlflow.exceptions import MlflowException
from PIL import Image

from ssl_models.data import DataError, read_idx
from tasks import orchestration, registry
from tasks.config import PipelineConfig
from tasks.watch import Watch, count_images
from tests.test_promotion import log_predictions, new_challenger, scored, snapshot


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


def test_a_stage_retries_a_transient_failure_and_not_a_bad_input(prefect_api: str, tmp_path: Path) -> None:
    from prefect import flow, task

    cfg = PipelineConfig.model_validate(
        {"workspace": str(tmp_path / "ws"), "orchestration": {"retries": 2, "retry_delay_seconds": 0}}
    )
    calls: list[str] = []

    @task
    def flaky(error: Exception) -> str:
        calls.append(type(error).__name__)
        if len(calls) == 1:
            raise error
        return "done"

    @flow
    def stage(error: Exception) -> str:
        return flaky.with_options(**orchestration.stage_options(cfg, "sweep"))(error)

    assert stage(ConnectionRefusedError("the MLflow server is restarting")) == "done"
    assert calls == ["ConnectionRefusedError", "ConnectionRefusedError"]
    calls.clear()
    with pytest.raises(DataError, match="cannot decode"):
        stage(DataError("data/unlabeled/x.png: cannot decode"))
    assert calls == ["DataError"]  # not retried


def test_a_cached_stage_is_reused_across_runs_and_recomputed_when_its_files_are_gone(
    prefect_api: str, tmp_path: Path
) -> None:
    from prefect import flow, task

    from flows.pipeline import _cached
    from tasks.data import DatasetRef, PreparedData

    cfg = PipelineConfig.model_validate({"workspace": str(tmp_path / "ws")})
    calls: list[int] = []

    @task
    def prepare(cfg: PipelineConfig, size: int) -> PreparedData:
        calls.append(size)
        path = tmp_path / f"tensors-{size}.pt"
        path.write_bytes(b"x" * size)
        ref = DatasetRef("unlabeled", str(path), "0" * 64, size, ())
        return PreparedData(ref, ref, ref, 0.5, 0.25)

    @flow
    def run(size: int, refresh: bool = False) -> PreparedData:
        key = orchestration.stage_key("prepare-test", size)
        result: PreparedData = _cached(prepare, cfg, "data", key, refresh, size)
        return result

    first = run(3)
    assert run(3) == first and calls == [3]  # the second run: from the persisted result
    assert list((tmp_path / "ws" / "prefect" / "results").iterdir())
    run(4)
    assert calls == [3, 4]  # another key
    Path(first.unlabeled.path).unlink()  # the workspace lost the file the cached result names
    assert run(3) == first and calls == [3, 4, 3] and Path(first.unlabeled.path).exists()
    run(3, refresh=True)
    assert calls == [3, 4, 3, 3]


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
    assert new_challenger(cfg, scored(0.80)).version == "1"
    before = snapshot(cfg)
    real_report = registry._log_report

    def report_fails(*args: Any) -> None:
        raise RuntimeError("report upload failed")

    monkeypatch.setattr(registry, "_log_report", report_fails)
    client = registry.client_for(cfg)
    run = client.create_run(client.get_experiment_by_name("gate").experiment_id)
    better = scored(0.9)
    log_predictions(client, run.info.run_id, better, tmp_path)

    @flow
    def promote_in_a_transaction() -> registry.PromotionOutcome:
        return register_and_gate(
            cfg, f"runs:/{run.info.run_id}/model", run.info.run_id, {}, better.evaluation, "w2"
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


def test_ingesting_new_unlabeled_images_emits_the_event_the_trigger_expects(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_dvc: None
) -> None:
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.schemas.events import Resource

    from tests.test_data_versioning import cli, git

    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    assert cli("data", "init", "--root", str(repo), "--remote", str(tmp_path / "remote"))[0] == 0
    _pngs(tmp_path / "incoming", 0, 12)
    code, output = cli("data", "ingest", str(tmp_path / "incoming"), "--root", str(repo), "--no-push")
    assert code == 0, output
    assert f"emitted {orchestration.DATA_ARRIVED} (12 new images)" in output
    code, output = cli("data", "ingest", str(tmp_path / "incoming"), "--root", str(repo), "--no-push")
    assert code == 0 and "emitted" not in output  # nothing new, no event

    from prefect.client.orchestration import get_client

    query = EventFilter(event=EventNameFilter(name=[orchestration.DATA_ARRIVED])).model_dump(mode="json")
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while not events and time.monotonic() < deadline:  # the server stores events in batches
            time.sleep(0.5)
            response = client._client.post("/events/filter", json={"filter": query})
            response.raise_for_status()
            events = [
                e
                for e in response.json()["events"]
                if e["resource"]["prefect.resource.id"].endswith(".dataset")
            ]
    assert [e["payload"] for e in events] == [{"new_images": 12, "images": 12}]
    # The deployment's trigger matches it (Prefect's own matching), and would not match others.
    trigger = orchestration.retraining_triggers()[0]
    assert trigger.match.matches(Resource.model_validate(events[0]["resource"]))
    assert not trigger.match.matches(Resource.model_validate({"prefect.resource.id": "other.dataset"}))


# Slow: the CLI and `ssl-pipeline serve` in their own processes, on real Fashion-MNIST.


def _fashion_folders(fashion_mnist_dir: Path, root: Path) -> dict[str, Path]:
    """Fashion-MNIST as image folders: unlabeled (flat), labeled and test (one folder per class)."""
    train = read_idx(fashion_mnist_dir / "train-images-idx3-ubyte.gz")
    labels = read_idx(fashion_mnist_dir / "train-labels-idx1-ubyte.gz")
    folders = {name: root / name for name in ("unlabeled", "labeled", "test")}
    folders["unlabeled"].mkdir(parents=True)
    for i in range(256):
        Image.fromarray(train[i]).save(folders["unlabeled"] / f"{i:05d}.png")
    for name, start, count in (("labeled", 10_000, 400), ("test", 20_000, 200)):
        for i in range(start, start + count):
            folder = folders[name] / f"class{labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(train[i]).save(folder / f"{i:05d}.png")
    return folders


def _wait_for_run(client: Any, deployment_id: Any, reason: str, timeout: float) -> Any:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
        done = [r for r in runs if r.parameters.get("reason") == reason and r.state and r.state.is_final()]
        if done:
            return done[0]
        time.sleep(2)
    raise AssertionError(f"no {reason} run of the deployment finished in {timeout:.0f} s")


@pytest.mark.slow
def test_new_images_start_a_run_and_a_scheduled_run_without_new_data_ends_early(
    prefect_api: str, tmp_path: Path, fashion_mnist_dir: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tests.test_pipeline import CLI, kill_session, run_cli_env, smoke_args

    folders = _fashion_folders(fashion_mnist_dir, tmp_path / "images")
    workspace = tmp_path / "ws"
    args = smoke_args(
        workspace,
        "data.source=folder",
        *(f"data.{name}_dir={folder}" for name, folder in folders.items()),
        f"orchestration.watch={folders['unlabeled']}",
        "orchestration.poll_seconds=1",
        "orchestration.min_new_images=32",
        "orchestration.retries=0",
        # Two sweep cells (kNN and the linear probe on every label): the trigger, not the grid, is tested.
        "evaluate.label_fractions=[1.0]",
        "evaluate.finetune_fractions=[]",
        "evaluate.primary_protocol=linear",
        command="serve",
    )
    env = {**run_cli_env(), "PREFECT_API_URL": prefect_api}
    log = (tmp_path / "serve.log").open("w+")
    served = subprocess.Popen(
        [*CLI, *args], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while not list((workspace / "prefect").glob("watch-*.json")):  # deployment up, first poll done
                assert served.poll() is None, Path(log.name).read_text()[-3000:]
                assert time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
                time.sleep(0.5)
            deployment = client.read_deployment_by_name("retrain/retrain")

            # 40 new images (>= 32) arrive: the watch emits the event, the trigger starts a run.
            train = read_idx(fashion_mnist_dir / "train-images-idx3-ubyte.gz")
            for i in range(256, 296):
                Image.fromarray(train[i]).save(folders["unlabeled"] / f"{i:05d}.png")
            triggered = _wait_for_run(client, deployment.id, "new-data", timeout=600)
            assert triggered.state.is_completed(), Path(log.name).read_text()[-4000:]
            uri = f"sqlite:///{workspace / 'mlflow.db'}"
            registry_client = MlflowClient(uri, registry_uri=uri)
            version = registry_client.get_model_version("ssl-pipeline-fashion-mnist", "1")
            assert version.tags["promotion.outcome"] == "promoted"  # considered, and promoted (first)
            assert version.tags["data.unlabeled.sha256"]

            # The weekly schedule, backfilled for the past week: Prefect's scheduler makes that run
            # now, with no waiting. Nothing new arrived, so it ends after the data step.
            now = datetime.datetime.now(datetime.UTC)
            client._client.post(
                f"/deployments/{deployment.id}/schedule",
                json={
                    "start_time": (now - datetime.timedelta(days=7)).isoformat(),
                    "end_time": now.isoformat(),
                },
            ).raise_for_status()
            scheduled = _wait_for_run(client, deployment.id, "schedule", timeout=300)
            assert scheduled.state.is_completed()
            messages, deadline = "", time.monotonic() + 60
            while "Ended early" not in messages and time.monotonic() < deadline:  # logs arrive in batches
                logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[scheduled.id])))
                messages = " ".join(entry.message for entry in logs)
                time.sleep(1)
            assert "Ended early (schedule run): no new data since the champion (version 1)" in messages
            assert len(registry_client.search_model_versions("name='ssl-pipeline-fashion-mnist'")) == 1
    finally:
        kill_session(served.pid)
        served.wait()


def test_prefect_yaml_deploys_what_serve_registers() -> None:
    """The work-pool deployment (prefect.yaml) and `ssl-pipeline serve` schedule and trigger alike."""
    import importlib

    import yaml
    from prefect.events import DeploymentEventTrigger

    from flows.deployment import retrain
    from tasks.config import load_config
    from tests.conftest import REPO

    (spec,) = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    cfg = load_config(REPO / "params.yaml")
    assert spec["name"] == cfg.orchestration.deployment
    path, _, name = spec["entrypoint"].partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert getattr(module, name) is retrain
    assert set(spec["parameters"]) <= set(retrain.parameters.properties)
    (schedule,) = spec["schedules"]
    (expected,) = orchestration.retraining_schedules(cfg)
    assert (schedule["cron"], schedule["timezone"], schedule["parameters"]) == (
        expected.cron,
        expected.timezone,
        expected.parameters,
    )
    (trigger,) = spec["triggers"]
    parsed = DeploymentEventTrigger.model_validate({k: v for k, v in trigger.items() if k != "type"})
    (served,) = orchestration.retraining_triggers()
    for field in ("name", "expect", "match", "parameters"):
        assert getattr(parsed, field) == getattr(served, field), field
