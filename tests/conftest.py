import os
from pathlib import Path

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
