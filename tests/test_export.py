"""Models users take away: ONNX and TorchScript equal to PyTorch, the encoder's state dict loading
into the architecture it names, on real Fashion-MNIST images."""

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from ssl_models.classifier import ClassifierSpec, ImageClassifier
from ssl_models.data import load_fashion_mnist
from ssl_models.export import export_classifier

CLASSES = tuple(f"class_{i}" for i in range(10))


def classifier(backbone: str) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(ClassifierSpec(backbone, 1, 28, 0.286, 0.353, CLASSES)).eval()


@pytest.fixture(scope="module")
def images(fashion_mnist_dir: Path) -> torch.Tensor:
    """16 test images as the exported models take them: float N x 1 x 28 x 28 in [0, 1]."""
    return load_fashion_mnist(fashion_mnist_dir)[1].images[:16].float() / 255


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18", "mobilenetv3_small_050"])  # the last: timm
def test_onnx_and_torchscript_outputs_equal_pytorchs(
    backbone: str, images: torch.Tensor, tmp_path: Path
) -> None:
    model = classifier(backbone)
    with torch.no_grad():
        expected = {"encoder": model[0](images).numpy(), "classifier": model(images).numpy()}
    export_classifier(model, tmp_path / "onnx", "onnx")
    export_classifier(model, tmp_path / "ts", "torchscript")
    for name, want in expected.items():
        session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / f"{name}.onnx"))
        (got,) = session.run(None, {"images": images.numpy()})  # 16 images: the batch axis is dynamic
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        scripted = torch.jit.load(str(tmp_path / "ts" / f"{name}.torchscript.pt"))
        np.testing.assert_allclose(scripted(images).detach().numpy(), want, atol=1e-4, rtol=0)
    readme = (tmp_path / "onnx" / "README.md").read_text()
    assert "(x - 0.286000) / 0.353000" in readme and "class_0, class_1" in readme


def test_the_encoders_state_dict_loads_into_the_torchvision_architecture_it_names(
    images: torch.Tensor, tmp_path: Path
) -> None:
    """ResNet-18 and ViT-Tiny at 28 px: the README's recipe builds the module; strict loading works
    and gives the encoder's features on normalised images."""
    from torchvision.models import resnet18
    from torchvision.models.vision_transformer import VisionTransformer

    resnet = classifier("resnet18")
    export_classifier(resnet, tmp_path / "resnet", "state-dict")
    readme = (tmp_path / "resnet" / "README.md").read_text()
    assert (
        "torchvision.models.resnet18() with conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)"
        in readme
    )
    net = resnet18()
    net.conv1, net.maxpool, net.fc = (
        nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False),
        nn.Identity(),
        nn.Identity(),
    )
    net.load_state_dict(torch.load(tmp_path / "resnet" / "encoder_state_dict.pt", weights_only=True))
    normalised = (images - 0.286) / 0.353
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(normalised), resnet[0](images))

    vit = classifier("vit_tiny")
    export_classifier(vit, tmp_path / "vit", "state-dict")
    assert (
        "VisionTransformer(image_size=28, patch_size=4, num_layers=12, num_heads=3, hidden_dim=192"
        in (tmp_path / "vit" / "README.md").read_text()
    )
    model = VisionTransformer(
        image_size=28, patch_size=4, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768
    )
    model.conv_proj = nn.Conv2d(1, 192, 4, 4)
    model.heads = nn.Identity()
    model.load_state_dict(torch.load(tmp_path / "vit" / "encoder_state_dict.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(normalised), vit[0](images))
    assert (tmp_path / "vit" / "classifier.pt").exists()


def test_a_timm_encoders_state_dict_round_trips_into_timm(images: torch.Tensor, tmp_path: Path) -> None:
    import timm

    model = classifier("mobilenetv3_small_050")
    export_classifier(model, tmp_path, "state-dict")
    assert (
        "timm.create_model('mobilenetv3_small_050', num_classes=0, in_chans=1)"
        in (tmp_path / "README.md").read_text()
    )
    rebuilt = timm.create_model("mobilenetv3_small_050", num_classes=0, in_chans=1)
    rebuilt.load_state_dict(torch.load(tmp_path / "encoder_state_dict.pt", weights_only=True))
    with torch.no_grad():
        np.testing.assert_allclose(
            rebuilt.eval()((images - 0.286) / 0.353).numpy(), model[0](images).numpy(), atol=1e-4, rtol=0
        )
