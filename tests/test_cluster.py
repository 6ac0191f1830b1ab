"""The pipeline on a two-node Ray cluster started with `ray start`, its data and checkpoints in S3.

The head node has no CPUs, so every Ray task and actor (the Ray Data reads and decodes, the Ray
Train worker, the Tune trials) runs on the second node; the driver only coordinates. The datasets
are read from the DVC remote in S3 (``data.streaming.shards_from: remote``): SeaweedFS's own
counters show the shards' bytes leaving the remote's bucket, and the registered model's lineage
names the dataset versions.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, free_port

BIN = Path(sys.executable).parent


@pytest.fixture
def two_nodes() -> Iterator[tuple[str, dict[str, str]]]:
    """A head node without CPUs and a worker node with 2, each with its own temp dir; the address."""
    # Ray's socket paths must stay under 108 characters: short folders in /tmp.
    folders = [
        Path(tempfile.mkdtemp(prefix="rh", dir="/tmp")),
        Path(tempfile.mkdtemp(prefix="rw", dir="/tmp")),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_", "MLFLOW_"))}
    # `ray start --head` turns on Ray's token authentication: every node and the driver share the token.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.update(RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{env['PATH']}")
    address = f"127.0.0.1:{free_port()}"
    common = ["--num-gpus=0", "--disable-usage-stats"]
    try:
        head = [str(BIN / "ray"), "start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=0"]
        head += ["--include-dashboard=false", f"--temp-dir={folders[0]}", *common]
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        worker = [str(BIN / "ray"), "start", f"--address={address}", "--num-cpus=2"]
        worker += ['--resources={"worker_node": 1}', f"--temp-dir={folders[1]}", *common]
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=120)
        yield address, env
    finally:
        # `ray stop` would stop every Ray on the machine (the test session's too): end these nodes only.
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if any(str(folder) in cmdline for folder in folders):
                process.send_signal(signal.SIGKILL)
        for folder in folders:
            subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.mark.slow
def test_the_pipeline_on_two_ray_nodes_streams_the_shards_from_s3(
    two_nodes: tuple[str, dict[str, str]],
    s3_server,
    prefect_server: str,
    fashion_mnist_dir: Path,
    tmp_path: Path,
) -> None:
    address, env = two_nodes
    s3 = s3_server.client()
    for bucket in ("cluster-dvc", "cluster-ray"):
        s3.create_bucket(Bucket=bucket)
    env = {**env, **s3_server.env(), "RAY_ADDRESS": address, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env["PREFECT_API_URL"] = prefect_server
    repo = tmp_path / "repo"
    repo.mkdir()
    keys = [
        f"workspace={tmp_path / 'ws'}",
        f"data.dvc.root={repo}",
        "data.dvc.remote=s3://cluster-dvc/dvc",
        f"data.dvc.endpoint_url={s3_server.endpoint_url}",
        "data.streaming.shards_from=remote",
        "ray.storage_path=s3://cluster-ray/ray",
        f"ray.storage_endpoint_url={s3_server.endpoint_url}",
        "ray.cpus_per_worker=1",
        "orchestration.retries=0",
        "tracking.registered_model=cluster-model",
        # Two sweep cells (kNN and the linear probe on every label, one seed): where the trials run,
        # not the grid, is what this test is about.
        "evaluate.label_fractions=[1.0]",
        "evaluate.finetune_fractions=[]",
        "evaluate.primary_protocol=linear",
    ]
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--config",
        str(REPO / "params.yaml"),
        "--profile",
        "smoke",
    ]
    sets = [arg for key in keys for arg in ("--set", key)]
    command += sets
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert "promoted to champion" in run.stdout

    # The shards of all three datasets left S3 (each at least once): the cluster read them there.
    shards = sum(p.stat().st_size for p in (repo / "data").glob("*/shards/*.parquet"))
    assert shards > 0 and s3_server.bytes_sent("cluster-dvc") >= shards
    # Checkpoints went to S3 too; nothing of the run's state is in the workspace.
    assert s3.list_objects_v2(Bucket="cluster-ray", Prefix="ray/")["KeyCount"] > 0
    assert not (tmp_path / "ws" / "ray").exists()

    lineage = subprocess.run(
        [*command[:3], "lineage", "models:/cluster-model@champion", "--json", *command[4:8], *sets],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert lineage.returncode == 0, lineage.stdout + lineage.stderr
    data = json.loads(lineage.stdout)["data"]
    for name in ("unlabeled", "labeled", "test"):
        recorded = (repo / "data" / f"{name}.dvc").read_text().split("md5: ")[1].split()[0]
        assert data[name]["dvc_md5"] == recorded


def test_ray_workers_run_on_jemalloc_keeping_freed_pages(ray_cluster: str) -> None:
    import ctypes.util

    import ray

    from tasks.cluster import JEMALLOC_CONF

    if ctypes.util.find_library("jemalloc") is None:
        pytest.fail("libjemalloc.so.2 is missing: run infra/setup.sh (apt-get install libjemalloc2)")

    @ray.remote
    def allocator() -> tuple[bool, str | None]:
        return "libjemalloc" in Path("/proc/self/maps").read_text(), os.environ.get("MALLOC_CONF")

    assert ray.get(allocator.remote()) == (True, JEMALLOC_CONF)


def test_the_worker_allocator_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes.util

    from tasks.cluster import worker_env
    from tasks.config import load_config

    def config(choice: str):
        return load_config(REPO / "params.yaml", overrides=[f"ray.worker_allocator={choice}"])

    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert worker_env(config("system")) == {}
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")  # the user's own setting stays theirs
    assert set(worker_env(config("jemalloc"))) == {"LD_PRELOAD"}

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert worker_env(config("auto")) == {}
    with pytest.raises(ValueError, match=r"ray.worker_allocator: jemalloc, but libjemalloc.so.2 is not"):
        worker_env(config("jemalloc"))
