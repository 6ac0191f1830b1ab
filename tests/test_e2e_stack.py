"""End to end against the real local stack (``ssl-pipeline stack up``: SeaweedFS S3, PostgreSQL behind
``mlflow server`` with its artifacts in S3, ``prefect server``, on loopback, free ports).

One smoke run of the pipeline CLI, pretraining on 2 Ray workers: ingest -> DVC push to S3 -> pretraining
-> Ray Tune sweep -> register -> promotion gate. Then each test looks at it as a user would: MLflow's
REST API and its UI (headless Chromium) list the runs and the champion, the artifacts are in S3;
Prefect's API lists the flow run and its stages; the champion's lineage names the DVC hashes that S3
holds; Ray's checkpoints are in S3, written by a 2-worker run. About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tasks import stack
from tasks.config import PipelineConfig, load_config
from tests.browser import Browser, find_chromium
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # the first test also starts the stack and runs

PARAMS = REPO / "params.yaml"
CLI = [sys.executable, "-m", "flows.cli"]
MODEL = "ssl-pipeline-fashion-mnist"  # tracking.registered_model's default
SPLITS = ("unlabeled", "labeled", "test")
STAGES = ("data", "pretraining", "sweep-and-log-model", "register-version", "promotion-gate")
ROWS = '[role="row"]'  # the rows of MLflow's tables (header row included)
UI_TIMEOUT_S = 90.0  # a first load of the UI takes seconds on a quiet machine, more beside training


def _free_base_port(width: int = len(stack.WEED_SERVERS) + 3) -> int:
    """A port p with p .. p+width-1 free, and weed's gRPC ports (its 5 ports + 10000) free too, below
    the ephemeral range: weed's 5 ports, then MLflow, Prefect and PostgreSQL."""
    weed = len(stack.WEED_SERVERS)
    for base in random.sample(range(20000, 32768 - stack.GRPC_OFFSET - width), 300):
        ports = [base + i for i in range(width)] + [base + i + stack.GRPC_OFFSET for i in range(weed)]
        if all(stack._port_free("127.0.0.1", p) for p in ports):
            return base
    raise RuntimeError("no free ports")


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@dataclass(frozen=True)
class LiveStack:
    folder: Path  # holds the stack's folder, the workspace and Ray's session folder
    cfg: PipelineConfig
    stack: stack.Stack
    env: dict[str, str]  # what `ssl-pipeline stack env` exports: AWS_*, MLFLOW_TRACKING_URI, PREFECT_API_URL
    overrides: list[str]  # the --set keys that point the pipeline at the stack

    @property
    def bucket(self) -> str:
        return self.cfg.stack.bucket

    @property
    def mlflow_url(self) -> str:
        return self.stack.url("mlflow")

    @property
    def prefect_api(self) -> str:
        return self.env["PREFECT_API_URL"]

    @property
    def ray_tmp(self) -> Path:
        return self.folder / "r"  # short: Ray's socket paths must stay under 108 bytes

    def s3(self) -> Any:
        creds = self.stack.credentials()
        assert creds is not None
        return self.stack.s3_client(creds)

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def cli(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        """``ssl-pipeline ARGS`` in a fresh process, with the stack's environment and nothing of the
        test process's Prefect, MLflow, AWS or Ray settings."""
        prefixes = ("PREFECT_", "MLFLOW_", "AWS_", "RAY_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env.update(self.env)
        env.update(
            PYTHONPATH=str(REPO),
            COLUMNS="200",
            RAY_TMPDIR=str(self.ray_tmp),  # Ray's session folder (its logs) here, not in /tmp/ray
            RAY_USAGE_STATS_ENABLED="0",
            # Only the stack's keys, not a user's AWS profile (missing files are fine; /dev/null is not).
            AWS_CONFIG_FILE=str(self.folder / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.folder / "no-aws-credentials"),
        )
        return subprocess.run(
            [*CLI, *args], cwd=self.folder, env=env, capture_output=True, text=True, timeout=timeout
        )


@dataclass(frozen=True)
class PipelineRun:
    live: LiveStack
    workspace: Path
    sets: list[str]  # the run's --set keys
    report: dict[str, Any]  # what `run --report` wrote
    stdout: str

    def cli_args(self) -> list[str]:
        return ["--config", str(PARAMS), *(arg for key in self.sets for arg in ("--set", key))]


@pytest.fixture(scope="module")
def live_stack() -> Iterator[LiveStack]:
    """``stack up`` (PostgreSQL if installed, else SQLite) on free ports; always ``down --purge`` after."""
    # Not pytest's tmp_path: as root PostgreSQL runs as `nobody`, who must be able to enter the folder.
    folder = Path(tempfile.mkdtemp(prefix="ssl-e2e-"))
    folder.chmod(0o755)
    base = _free_base_port()
    weed = len(stack.WEED_SERVERS)
    keys = {
        "dir": folder / "stack",
        "s3_port": base,
        "mlflow_port": base + weed,
        "prefect_port": base + weed + 1,
        "postgres_port": base + weed + 2,
    }
    cfg = load_config(PARAMS, "default", [f"stack.{key}={value}" for key, value in keys.items()])
    try:
        stack.up(cfg)
        yield LiveStack(folder, cfg, stack.Stack(cfg), stack.env(cfg), stack.stack_overrides(cfg))
    finally:
        stack.down(cfg, purge=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def pipeline_run(live_stack: LiveStack) -> PipelineRun:
    """``ssl-pipeline run --profile smoke`` with the stack's env and overrides, pretraining on 2 Ray
    workers of 1 CPU each (the sweep's trials take 1 CPU each)."""
    workspace = live_stack.folder / "ws"
    report = live_stack.folder / "report.json"
    sets = [
        f"workspace={workspace}",
        f"data.dvc.root={workspace / 'dvc-repo'}",
        *live_stack.overrides,
        "ray.num_workers=2",
        "ray.cpus_per_worker=1",
        "evaluate.distill.enabled=true",  # its students read their teachers from S3
    ]
    args = ["--config", str(PARAMS), "--profile", "smoke", *(arg for key in sets for arg in ("--set", key))]
    out = live_stack.cli("run", *args, "--report", str(report), timeout=1200)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-6000:]
    return PipelineRun(live_stack, workspace, sets, json.loads(report.read_text()), out.stdout)


def test_the_smoke_pipeline_runs_on_the_stack_and_promotes_version_1(pipeline_run: PipelineRun) -> None:
    live = pipeline_run.live
    assert live.stack.backend == ("postgresql" if stack.find_postgres() else "sqlite")
    assert all(s.healthy for s in stack.status(live.cfg))
    assert "version 1 promoted to champion: there is no champion yet" in pipeline_run.stdout
    report = pipeline_run.report
    assert (report["model_version"], report["champion_version"]) == ("1", "1")
    assert (report["registered"], report["promotion"]) == (True, "promoted")
    assert report["pretrain_resumed_from_step"] == 0
    # Everything went to the servers: no local MLflow store, DVC remote, Ray storage or Prefect results.
    workspace = pipeline_run.workspace
    for local in ("mlflow.db", "mlartifacts", "dvc-remote", "ray", "prefect"):
        assert not (workspace / local).exists(), local
    # Prefect's results of the cached stages are in S3.
    results = live.keys("prefect-results/")
    for stage in ("prepare-data", "pretraining", "sweep"):
        assert any(k.startswith(f"prefect-results/{stage}-") for k in results), (stage, results)


def test_mlflow_lists_both_runs_and_the_champion_with_artifacts_in_s3(pipeline_run: PipelineRun) -> None:
    from mlflow import MlflowClient

    live, report = pipeline_run.live, pipeline_run.report
    client = MlflowClient(live.mlflow_url, registry_uri=live.mlflow_url)
    pretraining = client.get_run(report["pretrain_run_id"])
    sweep_run = client.get_run(report["sweep_run_id"])
    assert pretraining.info.status == sweep_run.info.status == "FINISHED"
    assert pretraining.data.tags["pipeline.step"] == "pretrain"
    assert sweep_run.data.tags["pipeline.step"] == "sweep"
    assert sweep_run.data.tags["sweep.pretrain_run"] == pretraining.info.run_id
    experiment = client.get_experiment_by_name(live.cfg.tracking.experiment)
    assert experiment is not None
    listed = client.search_runs([experiment.experiment_id], max_results=1000)
    assert {pretraining.info.run_id, sweep_run.info.run_id} <= {r.info.run_id for r in listed}
    children = [r for r in listed if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    assert len(children) == report["trials"] and {c.info.status for c in children} == {"FINISHED"}
    # The distilled students learned from their teachers' checkpoints in the stack's S3.
    students = [c for c in children if c.data.tags["sweep.phase"] == "distill"]
    assert students and all(
        c.data.tags["sweep.teacher_checkpoint"].startswith(f"{live.cfg.stack.bucket}/ray/") for c in students
    ), [c.data.tags.get("sweep.teacher_checkpoint") for c in students]
    assert {p["protocol"] for p in report["accuracy"]} >= {"finetune", "distill", "supervised"}

    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1"
    # The gate moved `champion` to the new version; `challenger` (set at registration) points there too.
    aliases = client.get_registered_model(MODEL).aliases
    assert aliases["champion"] == "1" and set(aliases.values()) == {"1"}, aliases
    assert champion.run_id == sweep_run.info.run_id
    assert champion.tags["pretrain.run_id"] == pretraining.info.run_id
    assert champion.tags["promotion.outcome"] == "promoted"

    # The artifacts are in the bucket under the server's prefix; the clients held no S3 store of their own.
    assert sweep_run.info.artifact_uri.startswith("mlflow-artifacts:/")
    keys = set(live.keys("mlflow/"))
    exp = experiment.experiment_id
    assert f"mlflow/{exp}/{pretraining.info.run_id}/artifacts/pretrain/checkpoint.pt" in keys
    assert f"mlflow/{exp}/{sweep_run.info.run_id}/artifacts/promotion/version-1.json" in keys
    model_id = str(champion.source).removeprefix("models:/")
    for name in ("MLmodel", "artifacts/classifier.pt"):
        assert f"mlflow/{exp}/models/{model_id}/artifacts/{name}" in keys, (name, champion.source)


def test_prefect_lists_the_flow_run_and_its_stages(pipeline_run: PipelineRun) -> None:
    api = pipeline_run.live.prefect_api
    flow_runs = _post(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["ssl_pipeline"]}}})
    assert len(flow_runs) == 1, [(f["name"], f["state"]) for f in flow_runs]
    (flow_run,) = flow_runs
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    with urllib.request.urlopen(f"{api}/flows/{flow_run['flow_id']}", timeout=30) as response:
        assert json.load(response)["name"] == "ssl_pipeline"
    task_runs = _post(
        f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}, "limit": 200}
    )
    names = sorted(t["name"] for t in task_runs)
    for stage in STAGES:
        runs = [t for t in task_runs if re.fullmatch(rf"{re.escape(stage)}-\w+", t["name"])]
        assert len(runs) == 1, (stage, names)
        assert runs[0]["state"]["type"] == "COMPLETED", (stage, runs[0]["state"])
    assert {t["state"]["type"] for t in task_runs} == {"COMPLETED"}, names


def test_lineage_points_at_the_dvc_hashes_in_s3(pipeline_run: PipelineRun) -> None:
    live = pipeline_run.live
    chain = live.cli("lineage", f"models:/{MODEL}@champion", "--json", *pipeline_run.cli_args(), timeout=300)
    assert chain.returncode == 0, chain.stdout + chain.stderr
    lineage = json.loads(chain.stdout)
    assert lineage["model"]["version"] == "1" and "champion" in lineage["model"]["aliases"]
    assert lineage["pretraining_run"]["run_id"] == pipeline_run.report["pretrain_run_id"]
    assert lineage["sweep_run"]["run_id"] == pipeline_run.report["sweep_run_id"]
    assert lineage["pretraining_run"]["status"] == lineage["sweep_run"]["status"] == "FINISHED"
    assert len(lineage["code"]["git_commit"]) == 40

    s3 = live.s3()
    keys = set(live.keys("dvc/"))
    for split in SPLITS:
        dvc_file = pipeline_run.workspace / "dvc-repo" / "data" / f"{split}.dvc"
        recorded = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
        assert recorded.endswith(".dir"), recorded
        data = lineage["data"][split]
        assert data["dvc_md5"] == recorded, split
        assert data["sha256"] == pipeline_run.report["data_sha256"][split]
        # DVC 3's layout: <remote>/files/md5/<2 hex>/<rest>; the .dir object lists the folder's files.
        listing = f"dvc/files/md5/{recorded[:2]}/{recorded[2:]}"
        assert listing in keys, split
        entries = json.loads(s3.get_object(Bucket=live.bucket, Key=listing)["Body"].read())
        folder = pipeline_run.workspace / "dvc-repo" / "data" / split
        assert {e["relpath"] for e in entries} == {
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
        }, split
        manifest = next(e for e in entries if e["relpath"].startswith("manifest/"))
        body = s3.get_object(
            Bucket=live.bucket, Key=f"dvc/files/md5/{manifest['md5'][:2]}/{manifest['md5'][2:]}"
        )
        rows = pq.read_table(io.BytesIO(body["Body"].read())).num_rows
        assert rows == int(data["num_images"]), split
        missing = [
            e["relpath"] for e in entries if f"dvc/files/md5/{e['md5'][:2]}/{e['md5'][2:]}" not in keys
        ]
        assert not missing, (split, missing[:5])


def _train_worker_ranks(ray_tmp: Path, run_name: str) -> dict[int, int]:
    """World rank -> world size, from Ray Train's structured worker logs of ``run_name``'s process group."""
    ranks: dict[int, int] = {}
    for log in ray_tmp.glob("ray/session_*/logs/train/ray-train-sys-worker-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            found = re.search(r"rank=(\d+), world_size=(\d+)", record.get("message", ""))
            if record.get("run_name") == run_name and found:
                ranks[int(found[1])] = int(found[2])
    return ranks


def test_pretraining_ran_on_two_ray_workers_with_checkpoints_in_s3(pipeline_run: PipelineRun) -> None:
    from mlflow import MlflowClient

    live = pipeline_run.live
    pretraining = MlflowClient(live.mlflow_url).get_run(pipeline_run.report["pretrain_run_id"])
    assert pretraining.data.params["ray.num_workers"] == "2"
    assert pretraining.data.params["ray.storage_path"] == f"s3://{live.bucket}/ray"
    ray_run = pretraining.data.tags["pretrain.ray_run"]
    steps = int(pretraining.data.metrics["pretrain_steps"])
    checkpoint_uri = pretraining.data.tags["pretrain.checkpoint_uri"]
    assert checkpoint_uri == f"s3://{live.bucket}/ray/{ray_run}/step-{steps:08d}"
    keys = set(live.keys(f"ray/{ray_run}/"))
    assert f"ray/{ray_run}/step-{steps:08d}/checkpoint.pt" in keys, sorted(keys)
    assert f"ray/{ray_run}/checkpoint_manager_snapshot.json" in keys  # what a restart resumes from

    # Two DDP workers joined one process group: ranks 0 and 1 of world size 2.
    assert _train_worker_ranks(live.ray_tmp, ray_run) == {0: 2, 1: 2}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if find_chromium() is None:
        pytest.skip("Chromium is not installed: run infra/setup-test.sh (Debian's `chromium` package)")
    with Browser() as browser:
        yield browser


def _versions(rows: list[str]) -> dict[int, str]:
    """The model page's version rows by version number; a row reads "Version 1\\n<date>\\n...@ champion"."""
    return {int(m[1]): row for row in rows if (m := re.match(r"Version (\d+)\b", row))}


def _aliases(row: str) -> set[str]:
    """The alias tags of a row ("@ champion"; not the "@" of an e-mail address)."""
    return set(re.findall(r"(?:^|\s)@ (\S+)", row))


def test_the_mlflow_ui_shows_the_champion_and_both_runs(pipeline_run: PipelineRun, browser: Browser) -> None:
    from mlflow import MlflowClient

    live, report = pipeline_run.live, pipeline_run.report
    rows = browser.texts(
        ROWS,
        f"{live.mlflow_url}/#/models/{MODEL}",
        until=lambda rows: "champion" in _aliases(_versions(rows).get(1, "")),
        timeout_s=UI_TIMEOUT_S,
    )
    assert set(_versions(rows)) == {1}, rows
    assert "champion" in _aliases(_versions(rows)[1]), rows

    client = MlflowClient(live.mlflow_url)
    pretraining = client.get_run(report["pretrain_run_id"])
    sweep_run = client.get_run(report["sweep_run_id"])
    names = (pretraining.info.run_name, sweep_run.info.run_name)
    assert names == ("pretrain-simclr-small_cnn-smoke", "sweep-simclr-small_cnn-smoke")
    # The experiment's "Training runs" tab (its bare page opens the GenAI overview): both runs by name,
    # the trials as their child runs, the model version the sweep logged, the DVC versions of the data.
    champion = client.get_model_version_by_alias(MODEL, "champion")
    expected = [
        *names,
        f"{report['trials'] + 2} matching runs",
        *(f"{split} ({champion.tags[f'data.{split}.dvc_md5']})" for split in SPLITS),
    ]
    text = browser.text(
        f"{live.mlflow_url}/#/experiments/{pretraining.info.experiment_id}/runs",
        until=lambda text: all(e in text for e in expected) and bool(re.search(rf"{MODEL}\s*v1\b", text)),
        timeout_s=UI_TIMEOUT_S,
    )
    assert "Training runs" in text and live.cfg.tracking.experiment in text
