"""The registered model: an MLflow pyfunc that takes images and returns their classes.

Preprocessing is inside the model (``ssl_models.classifier``), so a client sends images, not
tensors. The model is logged as code ("models from code"): this file is the model's code and
``ssl_models`` ships with it, the weights are a state dict read with ``weights_only=True`` and
the spec is JSON. Loading it unpickles nothing, needs neither this checkout nor ``tasks``, and
MLflow 3.17 refuses to load a cloudpickled pyfunc unless ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``
is set.

Signature: one unnamed input, a 1-D tensor of objects (``Tensor('object', (-1,))``), one per
image: a base64 PNG/JPEG string, PNG/JPEG bytes, or an H x W [x C] array of integers in 0-255;
a uint8 batch N x H x W [x C] passes as is. Param ``return_embedding`` (boolean, default false).
Output: a DataFrame, one row per image: ``class`` (name), ``class_index``, ``probabilities``
(a list, in the order of the spec's classes) and, on request, ``embedding`` (the encoder's
features).

In Python::

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    model.predict(uint8_batch)  # N x H x W or N x H x W x C
    model.predict(pd.DataFrame({"image": [base64_png, ...]}), params={"return_embedding": True})

Over HTTP (``mlflow models serve -m models:/NAME@champion``), ``POST /invocations`` with
``Content-Type: application/json``, one of::

    {"inputs": ["iVBORw0KGgo...", "/9j/4AAQ..."]}
    {"inputs": ["iVBORw0KGgo..."], "params": {"return_embedding": true}}
    {"inputs": [[[0, 12, ...], ...], ...]}            (N x H x W [x C] integers)
    {"dataframe_split": {"columns": ["image"], "data": [["iVBORw0KGgo..."], ...]}}
    {"dataframe_records": [{"image": "iVBORw0KGgo..."}, ...]}

(``inputs`` must be a list: the input is unnamed, so ``{"inputs": {"image": [...]}}`` is refused;
a DataFrame's one column may have any name.) The answer, 200, is one record per image::

    {"predictions": [{"class": "Trouser", "class_index": 1, "probabilities": [0.001, 0.98, ...]},
                     ...]}

with ``"embedding": [...]`` added to each record when ``return_embedding`` is true. An image
that does not decode answers 400, ``{"error_code": "INVALID_PARAMETER_VALUE", "message": ...}``,
the message ending in ``Error: image INDEX: cannot decode as PNG or JPEG: ...`` (MLflow puts
the request's data before it).
"""

from __future__ import annotations

import base64
import io
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature, set_model
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.types.schema import Array
from PIL import Image

import ssl_models
from ssl_models.backbones import BACKBONES
from ssl_models.classifier import ClassifierSpec, ImageClassifier

WEIGHTS_FILE = "classifier.pt"
SPEC_FILE = "spec.json"

# A 1-D object tensor passes any array through MLflow's schema enforcement (a uint8 batch
# included), where a column-based schema would reject an N x H x W array before predict.
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
    outputs=Schema(
        [
            ColSpec("string", "class"),
            ColSpec("long", "class_index"),
            ColSpec(Array("float"), "probabilities"),
            ColSpec(Array("float"), "embedding", required=False),
        ]
    ),
    params=ParamSchema([ParamSpec("return_embedding", "boolean", False)]),
)


class ImageClassifierModel(PythonModel):
    """The pyfunc around ``ImageClassifier``: images in, a DataFrame with one row per image out."""

    def load_context(self, context: PythonModelContext) -> None:
        spec = ClassifierSpec.from_json(Path(context.artifacts["spec"]).read_text())
        self.classifier = ImageClassifier.load(spec, context.artifacts["weights"])

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        try:
            result = self.classifier.classify(model_input, bool((params or {}).get("return_embedding")))
        except ValueError as e:  # the client's input, not the model: a 400 with this message
            raise MlflowException.invalid_parameter_value(str(e)) from e
        columns: dict[str, Any] = {
            "class": result.labels,
            "class_index": result.class_index,
            "probabilities": result.probabilities.tolist(),
        }
        if result.embedding is not None:
            columns["embedding"] = result.embedding.tolist()
        return pd.DataFrame(columns)


# MLflow executes this file to load the model (models from code); it takes the model set here.
set_model(ImageClassifierModel())


def pip_requirements(spec: ClassifierSpec) -> list[str]:
    """The serving environment, pinned to this one's versions (no inference by loading the model);
    timm for a timm backbone."""
    packages = ["mlflow", "torch", "torchvision", "numpy", "pillow", "pandas"]
    if spec.backbone not in BACKBONES:
        packages.append("timm")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def _example_png(spec: ClassifierSpec) -> str:
    """A blank image as base64 PNG: the input example shown with the model and checked at logging."""
    buffer = io.BytesIO()
    mode = "L" if spec.channels == 1 else "RGB"
    Image.new(mode, (spec.image_size, spec.image_size)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def log_image_classifier(
    run_id: str, state_path: str | Path, spec: ClassifierSpec, name: str = "classifier"
) -> str:
    """Log the classifier's state dict as the image pyfunc of run ``run_id``; its ``models:/m-...`` URI.

    Uses the tracking and registry URIs the caller set (``tasks.tracking.client_for``).
    """
    client = MlflowClient()
    # MLflow 3 files a logged model under the fluent API's current experiment, not its source
    # run's (it would land in experiment 0, under ./mlruns): point it at the run's.
    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        # Loading checks the weights fit the spec's architecture before anything is logged.
        weights = Path(tmp) / WEIGHTS_FILE
        torch.save(ImageClassifier.load(spec, state_path).state_dict(), weights)
        spec_path = Path(tmp) / SPEC_FILE
        spec_path.write_text(spec.to_json())
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=Path(__file__),
            code_paths=[str(Path(ssl_models.__file__).parent)],
            artifacts={"weights": str(weights), "spec": str(spec_path)},
            signature=SIGNATURE,
            input_example=np.array([_example_png(spec)], dtype=object),
            pip_requirements=pip_requirements(spec),
            metadata={"classifier": spec.to_dict()},
        )
    return info.model_uri


def load_classifier(model_uri: str) -> ImageClassifier:
    """The ``ImageClassifier`` inside a logged or registered model (``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``, ``runs:/...``), with the tracking URIs the caller set."""
    model = mlflow.pyfunc.load_model(model_uri)
    classifier = model.unwrap_python_model().classifier  # type: ignore[attr-defined]
    assert isinstance(classifier, ImageClassifier)
    return classifier
