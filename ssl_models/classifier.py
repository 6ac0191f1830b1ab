"""The deployed classifier: encoder + linear head behind the preprocessing that turns images into
its input.

``ImageClassifier`` is an ``Encoder`` then an ``nn.Linear``, the model a sweep trial probes or
fine-tunes, so it loads a trial's state dict as is. ``preprocess`` accepts what a client
sends: PNG or JPEG files (raw bytes, or base64 text) and uint8 pixel arrays, one at a time or as
a batch; every image is converted to the model's channels, resized to its size and scaled to
[0, 1].
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from ssl_models.backbones import Encoder, create_backbone

_MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class ClassifierSpec:
    """What it takes to rebuild the classifier and feed it: architecture, input, class names."""

    backbone: str
    channels: int
    image_size: int
    mean: float
    std: float
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.channels not in _MODES:
            raise ValueError(f"classifier spec: channels must be 1 or 3, got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"classifier spec: image_size must be positive, got {self.image_size}")
        if not self.std > 0:
            raise ValueError(f"classifier spec: std must be positive, got {self.std}")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classifier spec: classes must be distinct names, got {list(self.classes)}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassifierSpec:
        names = [f.name for f in fields(cls)]
        if unknown := [key for key in data if key not in names]:
            raise ValueError(f"classifier spec: unknown key {unknown[0]!r}; expected {names}")
        if missing := [name for name in names if name not in data]:
            raise ValueError(f"classifier spec: missing key {missing[0]!r}")
        return cls(**{**data, "classes": tuple(data["classes"])})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ClassifierSpec:
        return cls.from_dict(json.loads(text))


def decode_image(data: bytes | str) -> Image.Image:
    """A PNG or JPEG file from its bytes, or from base64 text of them."""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"not valid base64 ({e})") from e
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as file:
            file.load()
            return file.copy()
    except UnidentifiedImageError as e:
        raise ValueError(f"cannot decode as PNG or JPEG: not a PNG or JPEG file ({len(data)} bytes)") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode as PNG or JPEG: {e}") from e


def pixels_to_image(pixels: Any) -> Image.Image:
    """Integer pixels in 0-255, H x W or H x W x C (C = 1, 3 or 4), e.g. a uint8 array or nested lists."""
    try:
        array = np.asarray(pixels)
        if array.dtype == object:  # nested lists from JSON
            array = np.array(array.tolist())
    except ValueError as e:
        raise ValueError(f"not a rectangular pixel array ({e})") from e
    if array.dtype.kind not in "iu":
        raise ValueError(f"pixels must be integers in 0-255 (uint8), got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"pixels must be in 0-255, got {array.min()} to {array.max()}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or not array.size:
        raise ValueError(f"expected H x W or H x W x C pixels (C = 1, 3 or 4), got shape {array.shape}")
    return Image.fromarray(array.astype(np.uint8))


def _batch_items(images: Any) -> list[Any]:
    """The images of a batch: a list or 1-D array of files/arrays, or one N x H x W [x C] array."""
    if isinstance(images, (str, bytes)):
        raise TypeError("expected a batch of images, got a single str/bytes: wrap it in a list")
    if isinstance(images, np.ndarray) and images.dtype != object and images.ndim not in (3, 4):
        raise ValueError(f"a pixel batch is N x H x W or N x H x W x C, got shape {images.shape}")
    return list(images)


def preprocess(images: Iterable[Any] | np.ndarray, spec: ClassifierSpec) -> torch.Tensor:
    """Images to the model's input: float (N, C, S, S) in [0, 1].

    Each image is PNG/JPEG bytes, base64 text of them, or pixels (see ``pixels_to_image``). It is
    converted to the spec's channels (PIL ``L`` or ``RGB``; alpha is dropped) and, if it is not S x
    S, resized bilinearly to S x S as the training data was. A bad image raises ``ValueError``
    naming its index in the batch.
    """
    size = spec.image_size
    arrays = []
    for index, item in enumerate(_batch_items(images)):
        try:
            image = decode_image(item) if isinstance(item, (bytes, str)) else pixels_to_image(item)
        except ValueError as e:
            raise ValueError(f"image {index}: {e}") from e
        image = image.convert(_MODES[spec.channels])
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.uint8).reshape(size, size, spec.channels))
    if not arrays:
        raise ValueError("no images to classify")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.float().div(255)


@dataclass(frozen=True)
class Classification:
    """One row per image; probability columns in the order of ``ClassifierSpec.classes``."""

    labels: list[str]
    class_index: np.ndarray  # int64 (N,)
    probabilities: np.ndarray  # float32 (N, num_classes)
    embedding: np.ndarray | None  # float32 (N, D): the encoder's output, when asked for


class ImageClassifier(nn.Sequential):
    """``nn.Sequential(Encoder, nn.Linear)``: the state dict keys a sweep trial saves."""

    def __init__(self, spec: ClassifierSpec):
        encoder = Encoder(create_backbone(spec.backbone, spec.channels, spec.image_size), spec.mean, spec.std)
        super().__init__(encoder, nn.Linear(encoder.num_features, len(spec.classes)))
        self.spec = spec

    @classmethod
    def load(cls, spec: ClassifierSpec, state_path: str | Path) -> ImageClassifier:
        """The classifier with the weights of a state dict file, read without unpickling objects."""
        model = cls(spec)
        model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
        return model.eval()

    @torch.no_grad()
    def classify(self, images: Iterable[Any] | np.ndarray, return_embedding: bool = False) -> Classification:
        """Classify a batch of images (any input ``preprocess`` takes), 256 at a time."""
        encoder, head = self[0], self[1]
        embeddings = [encoder(chunk) for chunk in preprocess(images, self.spec).split(256)]
        embedding = torch.cat(embeddings)
        probabilities = head(embedding).softmax(dim=1)
        class_index = probabilities.argmax(dim=1).numpy()
        return Classification(
            labels=[self.spec.classes[i] for i in class_index],
            class_index=class_index,
            probabilities=probabilities.numpy(),
            embedding=embedding.numpy() if return_embedding else None,
        )
