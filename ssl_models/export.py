"""A classifier in forms other frameworks load: ONNX, TorchScript, or state dicts by architecture.

Every format writes the encoder (the pretrained or fine-tuned backbone, normalisation included)
and the classifier (encoder + linear head), with ``spec.json`` and a README of the
preprocessing. The ONNX and TorchScript models take float32 images N x C x H x W scaled to
[0, 1] (the normalisation is inside) with any batch size; the state dicts are named as the
architecture's own module (``encoder_state_dict.pt``: a torchvision ResNet or
VisionTransformer without its head, a timm model, or ``ssl_models.backbones.SmallCNN``), the normalisation
written in the README.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from ssl_models.backbones import Encoder, SmallCNN, TimmTrunk, ViTTrunk, _ResNetTrunk
from ssl_models.classifier import ImageClassifier

Format = Literal["onnx", "torchscript", "state-dict"]
FORMATS: tuple[str, ...] = get_args(Format)


def architecture_state_dict(backbone: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone's weights named as its architecture's module, and how to build that module."""
    if isinstance(backbone, _ResNetTrunk):
        net = backbone.net
        conv = net.conv1
        stem = (
            f"conv1 = nn.Conv2d({conv.in_channels}, {conv.out_channels}, {conv.kernel_size[0]}, "
            f"stride={conv.stride[0]}, padding={conv.padding[0]}, bias=False)"  # type: ignore[index]
        )
        maxpool = "; maxpool = nn.Identity()" if isinstance(net.maxpool, nn.Identity) else ""
        how = f"torchvision.models.{_resnet_name(net)}() with {stem}{maxpool}; fc = nn.Identity()"
        return net.state_dict(), how
    if isinstance(backbone, ViTTrunk):
        vit = backbone.vit
        how = (
            f"torchvision.models.vision_transformer.VisionTransformer(image_size={vit.image_size}, "
            f"patch_size={vit.patch_size}, num_layers={len(vit.encoder.layers)}, "
            f"num_heads={vit.encoder.layers[0].num_heads}, hidden_dim={vit.hidden_dim}, "
            f"mlp_dim={vit.mlp_dim}) with conv_proj taking {vit.conv_proj.in_channels} channel(s); "
            "heads = nn.Identity(); the output is the class token"
        )
        return vit.state_dict(), how
    if isinstance(backbone, SmallCNN):
        widths = tuple(m.out_channels for m in backbone.features if isinstance(m, nn.Conv2d))
        first = next(m for m in backbone.features if isinstance(m, nn.Conv2d))
        return backbone.state_dict(), f"ssl_models.backbones.SmallCNN({first.in_channels}, widths={widths})"
    if isinstance(backbone, TimmTrunk):
        architecture = backbone.net.pretrained_cfg["architecture"]  # type: ignore[index]
        first = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
        how = f"timm.create_model({architecture!r}, num_classes=0, in_chans={first.in_channels})"
        return backbone.net.state_dict(), how
    raise TypeError(f"no architecture name for {type(backbone).__name__}")


def _resnet_name(net: nn.Module) -> str:
    blocks = [len(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)]  # type: ignore[arg-type]
    bottleneck = type(net.layer1[0]).__name__ == "Bottleneck"  # type: ignore[index]
    names: dict[tuple[object, ...], str] = {
        (2, 2, 2, 2, False): "resnet18",
        (3, 4, 6, 3, False): "resnet34",
        (3, 4, 6, 3, True): "resnet50",
    }
    return names.get((*blocks, bottleneck), "ResNet")


def _readme(model: ImageClassifier, fmt: str, files: list[str], how: str) -> str:
    spec = model.spec
    mode = "grayscale (PIL mode L)" if spec.channels == 1 else "RGB"
    return f"""# ssl-pipeline export ({fmt})

Files: {", ".join(files)}.

Preprocessing, the same as the registered model's: decode the image, convert it to {mode},
resize it to {spec.image_size} x {spec.image_size} pixels (bilinear), and scale to [0, 1]
(uint8 / 255) as float32 of shape N x {spec.channels} x {spec.image_size} x {spec.image_size}.
The encoder and classifier models normalise inside: (x - {spec.mean:.6f}) / {spec.std:.6f}.

- encoder: N x {model[0].num_features} features (the backbone {spec.backbone}).
- classifier: N x {len(spec.classes)} logits (softmax for probabilities), classes in order:
  {", ".join(spec.classes)}.
- encoder_state_dict.pt: the backbone's weights named as {how}.
  It takes normalised images: apply (x - {spec.mean:.6f}) / {spec.std:.6f} first.
"""


def export_classifier(model: ImageClassifier, folder: str | Path, fmt: Format) -> list[Path]:
    """Write ``model`` (and its encoder) in ``fmt`` to ``folder``; returns the files written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    encoder = model[0]
    assert isinstance(encoder, Encoder)
    spec = model.spec
    example = torch.rand(2, spec.channels, spec.image_size, spec.image_size)
    written = [folder / "spec.json"]
    written[0].write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    parts = {"encoder": encoder, "classifier": model}
    if fmt == "onnx":
        for name, module in parts.items():
            path = folder / f"{name}.onnx"
            torch.onnx.export(
                module,
                (example,),
                path,
                input_names=["images"],
                output_names=["features" if name == "encoder" else "logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
            )
            written.append(path)
    elif fmt == "torchscript":
        for name, module in parts.items():
            path = folder / f"{name}.torchscript.pt"
            with torch.no_grad():
                torch.jit.trace(module, example).save(str(path))
            written.append(path)
    else:
        torch.save(model.state_dict(), folder / "classifier.pt")
        written.append(folder / "classifier.pt")
    weights, how = architecture_state_dict(encoder.backbone)
    torch.save(weights, folder / "encoder_state_dict.pt")
    written.append(folder / "encoder_state_dict.pt")
    readme = folder / "README.md"
    readme.write_text(_readme(model, fmt, [p.name for p in written], how))
    return [*written, readme]
