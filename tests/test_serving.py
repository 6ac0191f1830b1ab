"""The registered image classifier: a real Fashion-MNIST classifier, logged, registered, served.

A tiny CNN + linear head is trained for a few seconds on real training images, saved as the
state dict a sweep trial saves (an ``Encoder`` then an ``nn.Linear``), logged with ``log_image_classifier``
to a SQLite store under tmp and registered with alias ``champion``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from ssl_models import Encoder, create_backbone
from ssl_models.classifier import ClassifierSpec, ImageClassifier, preprocess
from ssl_models.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from tasks.serving import SPEC_FILE, WEIGHTS_FILE, log_image_classifier
from tests.conftest import free_port, http_server

MODEL_NAME = "fashion-classifier"
CHAMPION_URI = f"models:/{MODEL_NAME}@champion"


def encode(pixels: np.ndarray, fmt: str = "PNG", **options: Any) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def probabilities(frame: pd.DataFrame) -> np.ndarray:
    return np.array(frame["probabilities"].tolist())


@dataclass(frozen=True)
class Trained:
    spec: ClassifierSpec
    model: nn.Sequential
    state_path: Path
    images: np.ndarray  # uint8 (64, 28, 28) test images
    labels: np.ndarray


@pytest.fixture(scope="module")
def trained(fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """60 Adam steps on 6,000 training images (a few seconds): about 80% test accuracy."""
    train, test = load_fashion_mnist(fashion_mnist_dir)
    x = train.images[:6000].float() / 255
    y = train.labels[:6000]
    spec = ClassifierSpec("tiny_cnn", 1, 28, x.mean().item(), x.std().item(), FASHION_MNIST_CLASSES)
    torch.manual_seed(0)
    encoder = Encoder(create_backbone(spec.backbone, spec.channels, spec.image_size), spec.mean, spec.std)
    model = nn.Sequential(encoder, nn.Linear(encoder.num_features, len(spec.classes)))  # a trial's
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = torch.randint(0, len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    state_path = tmp_path_factory.mktemp("weights") / "classifier_state.pt"
    torch.save(model.state_dict(), state_path)
    return Trained(spec, model, state_path, test.images[:64, 0].numpy(), test.labels[:64].numpy())


@pytest.fixture(scope="module")
def store(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite store holding the logged classifier as version 1, alias ``champion``; its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    model_uri = log_image_classifier(run_id, trained.state_path, trained.spec)
    assert model_uri.startswith("models:/m-")
    client.create_registered_model(MODEL_NAME)
    version = client.create_model_version(MODEL_NAME, model_uri, run_id=run_id).version
    client.set_registered_model_alias(MODEL_NAME, "champion", version)
    return uri


@pytest.fixture(scope="module")
def served_model(store: str) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(CHAMPION_URI)


def test_spec_round_trips_through_json_and_names_a_bad_key(trained: Trained) -> None:
    assert ClassifierSpec.from_json(trained.spec.to_json()) == trained.spec
    with pytest.raises(ValueError, match="unknown key 'img_size'"):
        ClassifierSpec.from_dict({**trained.spec.to_dict(), "img_size": 28})
    with pytest.raises(ValueError, match="missing key 'std'"):
        ClassifierSpec.from_dict({k: v for k, v in trained.spec.to_dict().items() if k != "std"})


def test_preprocessing_converts_channels_and_size(trained: Trained) -> None:
    gray = trained.images[:2]
    expected = torch.from_numpy(gray).float().unsqueeze(1) / 255
    rgb = [np.repeat(image[:, :, None], 3, axis=2) for image in gray]  # L of gray RGB is exact
    assert torch.equal(preprocess(gray, trained.spec), expected)
    assert torch.equal(preprocess(gray[..., None], trained.spec), expected)  # N x H x W x 1
    assert torch.equal(preprocess(rgb, trained.spec), expected)
    assert torch.equal(preprocess([encode(image) for image in rgb], trained.spec), expected)
    large = np.kron(gray[0], np.ones((2, 2), dtype=np.uint8))  # 56 x 56
    assert preprocess([large], trained.spec).shape == (1, 1, 28, 28)
    with pytest.raises(ValueError, match=r"image 1: pixels must be in 0-255"):
        preprocess([gray[0], gray[1].astype(np.int64) + 200], trained.spec)
    with pytest.raises(ValueError, match=r"image 0: pixels must be integers"):
        preprocess([gray[0] / 255], trained.spec)


def test_uint8_batch_gives_the_torch_models_classes_and_probabilities(
    trained: Trained, served_model: mlflow.pyfunc.PyFuncModel
) -> None:
    out = served_model.predict(trained.images)
    with torch.no_grad():
        x = torch.from_numpy(trained.images).float().unsqueeze(1) / 255
        expected = trained.model(x).softmax(dim=1).numpy()
    assert list(out.columns) == ["class", "class_index", "probabilities"]
    assert out["class_index"].tolist() == expected.argmax(axis=1).tolist()
    assert out["class"].tolist() == [FASHION_MNIST_CLASSES[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(probabilities(out), expected, atol=1e-6)
    accuracy = (out["class_index"].to_numpy() == trained.labels).mean()
    assert accuracy > 0.6, f"accuracy {accuracy:.2f}: chance is 0.1"


def test_png_and_jpeg_inputs_agree_with_the_array_input(
    trained: Trained, served_model: mlflow.pyfunc.PyFuncModel
) -> None:
    from_arrays = served_model.predict(trained.images)
    png = [encode(image) for image in trained.images]
    from_png = served_model.predict(pd.DataFrame({"image": png}))
    pd.testing.assert_frame_equal(from_png, from_arrays)
    raw_png = np.array([base64.b64decode(text) for text in png], dtype=object)  # bytes, not base64
    pd.testing.assert_frame_equal(served_model.predict(raw_png), from_arrays)
    jpeg = np.array([encode(image, "JPEG", quality=95) for image in trained.images], dtype=object)
    from_jpeg = served_model.predict(jpeg)
    agree = (from_jpeg["class_index"] == from_arrays["class_index"]).mean()
    assert agree >= 0.9, f"JPEG and array classes agree on {agree:.0%} of the images"
    assert np.abs(probabilities(from_jpeg) - probabilities(from_arrays)).mean() < 0.02


def test_embedding_only_on_request(trained: Trained, served_model: mlflow.pyfunc.PyFuncModel) -> None:
    out = served_model.predict(trained.images[:4], params={"return_embedding": True})
    embedding = np.array(out["embedding"].tolist())
    encoder = trained.model[0]
    assert embedding.shape == (4, encoder.num_features)
    with torch.no_grad():
        expected = encoder(torch.from_numpy(trained.images[:4]).float().unsqueeze(1) / 255).numpy()
    np.testing.assert_allclose(embedding, expected, atol=1e-5)
    assert "embedding" not in served_model.predict(trained.images[:4]).columns


def test_an_undecodable_image_is_named_by_its_row(
    trained: Trained, served_model: mlflow.pyfunc.PyFuncModel
) -> None:
    png = [encode(image) for image in trained.images[:3]]
    truncated = base64.b64encode(base64.b64decode(png[0])[:40]).decode("ascii")
    garbage = base64.b64encode(b"GIF89a not an image").decode("ascii")
    for bad in (truncated, garbage):
        with pytest.raises(MlflowException, match="image 3: cannot decode as PNG or JPEG"):
            served_model.predict(np.array([*png, bad], dtype=object))


def test_every_documented_request_format_parses_as_the_scoring_server_parses_it(
    trained: Trained, served_model: mlflow.pyfunc.PyFuncModel
) -> None:
    """The scoring server's own parsing (``scoring_server.invocations``) without starting it."""
    from mlflow.pyfunc import scoring_server

    png = [encode(image) for image in trained.images[:3]]
    expected = served_model.predict(trained.images[:3])
    requests = [
        {"inputs": png},
        {"inputs": trained.images[:3].tolist()},
        {"dataframe_split": {"columns": ["image"], "data": [[text] for text in png]}},
        {"dataframe_records": [{"image": text} for text in png]},
        {"instances": png},
    ]
    for request in requests:
        answer = scoring_server.invocations(
            json.dumps(request), "application/json", served_model, served_model.metadata.get_input_schema()
        )
        assert answer.status == 200, (request, answer.response)
        predictions = pd.DataFrame(json.loads(answer.response)["predictions"])
        assert predictions["class"].tolist() == expected["class"].tolist()
        np.testing.assert_allclose(probabilities(predictions), probabilities(expected), atol=1e-6)


def test_the_model_holds_no_pickle_and_its_weights_load_with_weights_only(
    trained: Trained, store: str, tmp_path: Path
) -> None:
    folder = Path(mlflow.artifacts.download_artifacts(CHAMPION_URI, dst_path=str(tmp_path)))
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files
    pyfunc = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models from code
    assert "python_model" not in pyfunc  # no cloudpickled PythonModel
    assert {"serving.py", "code/ssl_models/classifier.py", f"artifacts/{SPEC_FILE}"} <= files
    state = torch.load(folder / "artifacts" / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    expected = trained.model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    assert ClassifierSpec.from_json((folder / "artifacts" / SPEC_FILE).read_text()) == trained.spec
    ImageClassifier.load(trained.spec, folder / "artifacts" / WEIGHTS_FILE)


def test_logging_refuses_weights_of_another_architecture(
    trained: Trained, store: str, tmp_path: Path
) -> None:
    client = MlflowClient(store)
    run_id = client.create_run(client.get_experiment_by_name("serving").experiment_id).info.run_id
    other = ClassifierSpec(**{**trained.spec.to_dict(), "backbone": "small_cnn", "classes": ("a", "b")})
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict"):
        log_image_classifier(run_id, trained.state_path, other)


def _post(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _server_env(store: str) -> dict[str, str]:
    # `mlflow models serve` starts `uvicorn` found on PATH: the venv's must come first.
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@pytest.mark.slow
def test_mlflow_models_serve_answers_real_images_over_http(
    trained: Trained, served_model: mlflow.pyfunc.PyFuncModel, store: str, tmp_path: Path
) -> None:
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION_URI]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    with http_server(
        command, f"{url}/ping", tmp_path / "serve.log", 90, cwd=tmp_path, env=_server_env(store)
    ):
        png = [encode(image) for image in trained.images]
        status, body = _post(f"{url}/invocations", {"inputs": png})
        assert status == 200, body
        answered = pd.DataFrame(body["predictions"])
        in_process = served_model.predict(np.array(png, dtype=object))
        assert answered["class"].tolist() == in_process["class"].tolist()
        np.testing.assert_allclose(probabilities(answered), probabilities(in_process), atol=1e-6)
        accuracy = (answered["class_index"].to_numpy() == trained.labels).mean()
        assert accuracy > 0.6, f"accuracy {accuracy:.2f} over HTTP: chance is 0.1"

        pixels = trained.images[:4]
        status, body = _post(
            f"{url}/invocations",
            {
                "dataframe_split": {"columns": ["image"], "data": [[text] for text in png[:4]]},
                "params": {"return_embedding": True},
            },
        )
        assert status == 200, body
        assert [len(row["embedding"]) for row in body["predictions"]] == [trained.model[0].num_features] * 4
        status, body = _post(f"{url}/invocations", {"inputs": pixels.tolist()})
        assert status == 200, body
        expected = served_model.predict(pixels)
        np.testing.assert_allclose(
            probabilities(pd.DataFrame(body["predictions"])), probabilities(expected), atol=1e-6
        )

        status, body = _post(f"{url}/invocations", {"inputs": [png[0], "bm90IGFuIGltYWdl"]})
        assert status == 400
        assert "image 1: cannot decode as PNG or JPEG" in body["message"]


@pytest.mark.slow
def test_a_fresh_process_outside_the_checkout_loads_the_code_shipped_with_the_model(
    trained: Trained, store: str, tmp_path: Path
) -> None:
    script = (
        "import json, sys, mlflow, numpy as np\n"
        f"model = mlflow.pyfunc.load_model({CHAMPION_URI!r})\n"
        "import ssl_models\n"
        "out = model.predict(np.array(json.loads(sys.stdin.read()), dtype=np.uint8))\n"
        "print(json.dumps({'ssl_models': ssl_models.__file__, 'classes': out['class'].tolist()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(trained.images[:8].tolist()),
        cwd=tmp_path,
        env=_server_env(store),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    repo = Path(__file__).resolve().parents[1]
    assert not Path(answer["ssl_models"]).resolve().is_relative_to(repo), answer["ssl_models"]
    assert Path(answer["ssl_models"]).parts[-3:] == ("code", "ssl_models", "__init__.py")
    with torch.no_grad():
        x = torch.from_numpy(trained.images[:8]).float().unsqueeze(1) / 255
        expected = [FASHION_MNIST_CLASSES[i] for i in trained.model(x).argmax(dim=1)]
    assert answer["classes"] == expected


@pytest.mark.slow
def test_logged_registered_and_loaded_through_a_real_mlflow_server_with_artifacts_in_s3(
    trained: Trained, mlflow_server: Any, s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client holds no S3 credentials: the server proxies the model's files to and from S3."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to a default location lands here, not in the repo
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_registry_uri(mlflow_server.uri)
    try:
        client = MlflowClient()
        run_id = client.create_run(client.create_experiment("serving-via-server")).info.run_id
        model_uri = log_image_classifier(run_id, trained.state_path, trained.spec)
        name = "fashion-classifier-via-server"
        client.create_registered_model(name)
        model_id = model_uri.removeprefix("models:/")
        version = client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id).version
        client.set_registered_model_alias(name, "champion", version)
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        out = model.predict(trained.images)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    with torch.no_grad():
        expected = trained.model(torch.from_numpy(trained.images).float().unsqueeze(1) / 255).argmax(1)
    assert out["class_index"].tolist() == expected.tolist()
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=mlflow_server.bucket)["Contents"]]
    assert any(k.endswith(f"/artifacts/{WEIGHTS_FILE}") for k in keys)
    assert any(k.endswith("/code/ssl_models/classifier.py") for k in keys)
