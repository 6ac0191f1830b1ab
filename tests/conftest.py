import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

for key, value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"{FASHION_MNIST} is missing: run infra/setup.sh (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST


@pytest.fixture
def images() -> torch.Tensor:
    """64 real-looking uint8 images: random blobs, reproducible."""
    g = torch.Generator().manual_seed(0)
    return (torch.rand(64, 1, 28, 28, generator=g) * 255).to(torch.uint8)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS on loopback, free ports) shared by the session's tests."""
    from tests.s3_server import SeaweedS3

    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(request: pytest.FixtureRequest, s3_server, tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` (loopback, free port) proxying artifacts to ``s3_server``, shared by the
    session's tests, so name experiments and models uniquely. Its store is SQLite, or PostgreSQL with
    ``@pytest.mark.parametrize("mlflow_server", ["postgresql"], indirect=True)``."""
    from tests.mlflow_server import MlflowServer, find_postgres

    backend = getattr(request, "param", "sqlite")
    if backend == "postgresql":
        try:
            find_postgres()
        except FileNotFoundError as e:
            pytest.skip(str(e))
    data_dir = tmp_path_factory.mktemp(f"mlflow-{backend}")
    with MlflowServer(data_dir, s3_server, bucket=f"mlflow-{backend}", backend=backend) as server:
        yield server


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """A local Ray shared by the session's tests, started as the pipeline starts it
    (``tasks.cluster.connect``, which later calls join); its address."""
    import ray

    from tasks.cluster import connect
    from tasks.config import load_config

    connect(load_config(REPO / "params.yaml"))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def free_port() -> int:
    """A port on loopback that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def http_server(
    command: list[str], ready_url: str, log_path: Path, timeout_s: float, **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """A server started in its own session, its output in ``log_path``, yielded once ``ready_url``
    answers 200 (its log's tail if it exits or times out first); stopped after, with its children."""
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                why = f"exited {server.returncode}" if server.poll() is not None else "gave no answer"
                tail = log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{command[0]} {why} at {ready_url} in {timeout_s:.0f} s:\n{tail}")
            try:
                with urllib.request.urlopen(ready_url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``prefect server start`` (loopback, free port, its own database) shared by the session's
    CLI runs in fresh processes: each then skips the temporary server it would start (about 15 s
    here). Its API URL."""
    port = free_port()
    home = tmp_path_factory.mktemp("prefect-server")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    command = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host=127.0.0.1"]
    url = f"http://127.0.0.1:{port}/api"
    with http_server([*command, f"--port={port}"], f"{url}/health", home / "server.log", 120, env=env):
        yield url


@pytest.fixture
def isolated_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep DVC, git and botocore away from the developer's own configuration and from /var/tmp."""
    for name in ("DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "DVC_SITE_CACHE_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "dvc-home" / name.lower()))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
