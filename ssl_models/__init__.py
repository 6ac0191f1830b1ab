"""Self-supervised representation learning in plain PyTorch.

No orchestration imports (Prefect, Ray, MLflow, DVC) here: the package is usable alone.
"""

from ssl_models.backbones import BACKBONES, Encoder, create_backbone
from ssl_models.classifier import ClassifierSpec, ImageClassifier
from ssl_models.methods import METHODS, SSLMethod, create_method

__all__ = [
    "BACKBONES",
    "METHODS",
    "ClassifierSpec",
    "Encoder",
    "ImageClassifier",
    "SSLMethod",
    "create_backbone",
    "create_method",
]
