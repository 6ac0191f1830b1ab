"""The tests' real `mlflow server` (tests/mlflow_server.py): tracking and registry over HTTP, with the
artifacts proxied to S3 for clients that hold no S3 credentials."""

import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


@pytest.fixture
def no_s3_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client knows nothing of S3, so every artifact byte has to go through the server."""
    credentials = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    for name in (*credentials, "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.mark.parametrize("mlflow_server", ["sqlite", "postgresql"], indirect=True)
def test_run_registry_alias_and_proxied_artifacts(
    mlflow_server, s3_server, no_s3_credentials, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)  # a call that missed the server's URI would write ./mlflow.db here
    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    name = f"test-server-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "knn_top1", 0.75)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(bytes(range(256)) * 16)
    client.log_artifact(run_id, str(weights), artifact_path="model")
    client.set_terminated(run_id)

    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id)
    client.set_registered_model_alias(name, "champion", version.version)

    champion = client.get_model_version_by_alias(name, "champion")
    assert (champion.version, champion.run_id) == (version.version, run_id)
    assert client.get_run(run_id).data.metrics == {"knn_top1": 0.75}
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    # Not "models:/name@alias": MLflow 3.17 resolves it with the global registry URI, whatever
    # download_artifacts(registry_uri=...) says.
    source = client.get_model_version_download_uri(name, champion.version)
    downloaded = mlflow.artifacts.download_artifacts(
        source, dst_path=str(tmp_path / "download"), tracking_uri=mlflow_server.uri
    )
    assert (Path(downloaded) / "weights.bin").read_bytes() == weights.read_bytes()

    key = f"{experiment_id}/{run_id}/artifacts/model/weights.bin"
    stored = s3_server.client().get_object(Bucket=mlflow_server.bucket, Key=key)["Body"].read()
    assert stored == weights.read_bytes()
