"""What is particular to one method: its loss formula, schedules and view layout."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssl_models.augment import AugmentParams, augment
from ssl_models.losses import batch_center, dino_loss, moco_v3_loss
from ssl_models.methods.relative_patch import grid_patches
from tasks.config import load_config
from tasks.pretrain import encoder_from_checkpoint
from tests.conftest import REPO
from tests.method_fixtures import small_method


def test_moco_v3_loss_matches_hand_computed_infonce() -> None:
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    tau = 0.2
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    rows = [
        -math.log(math.exp(qn[i] @ kn[i] / tau) / sum(math.exp(qn[i] @ kn[j] / tau) for j in range(5)))
        for i in range(5)
    ]
    assert moco_v3_loss(q, k, tau).item() == pytest.approx(2 * tau * sum(rows) / 5, rel=1e-5)
    k.requires_grad_(True)
    moco_v3_loss(q.requires_grad_(True), k, tau).backward()
    assert k.grad is None  # keys come from the momentum encoder


def test_dino_loss_pairs_every_teacher_view_with_every_other_student_view() -> None:
    teacher = [torch.randn(4, 6), torch.randn(4, 6)]
    student = [torch.randn(4, 6) for _ in range(3)]
    center = torch.randn(1, 6)
    t_s, t_t = 0.1, 0.04

    def cross_entropy(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return -(F.softmax((t - center) / t_t, -1) * F.log_softmax(s / t_s, -1)).sum(-1).mean()

    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # never a crop against itself
    expected = sum(cross_entropy(teacher[i], student[j]) for i, j in pairs) / len(pairs)
    torch.testing.assert_close(dino_loss(student, teacher, center, t_s, t_t), expected)
    torch.testing.assert_close(batch_center(teacher), torch.cat(teacher).mean(0, keepdim=True))


def test_dino_schedules_teacher_temperature_centre_and_momentum() -> None:
    method = small_method("dino", teacher_temperature_warmup=0.5)
    assert method.teacher_temperature.item() == pytest.approx(0.04)
    views = method.make_views(torch.rand(8, 1, 28, 28), AugmentParams(), torch.Generator().manual_seed(0))
    assert [tuple(v.shape[-2:]) for v in views] == [(28, 28)] * 2 + [(16, 16)] * 2
    method(views)
    with torch.no_grad():
        teacher = method.teacher_head(method.teacher_backbone(torch.cat(views[:2])))  # one BN batch
    method.on_step_end(0.25)  # half-way through the warmup
    assert method.teacher_temperature.item() == pytest.approx(0.055)
    torch.testing.assert_close(method.center, 0.1 * teacher.mean(0, keepdim=True))
    assert method.momentum == pytest.approx(1 - 0.004 * (math.cos(math.pi * 0.25) + 1) / 2)
    method.on_step_end(1.0)
    assert method.teacher_temperature.item() == pytest.approx(0.07)
    assert method.momentum == pytest.approx(1.0)


def test_grid_patches_without_gap_or_jitter_tile_the_image() -> None:
    image = torch.rand(2, 1, 12, 12)
    patches = grid_patches(image, gap=0.0, jitter=0.0, patch_size=4, g=torch.Generator().manual_seed(0))
    assert patches.shape == (2, 9, 1, 4, 4)
    for index in range(9):
        row, col = divmod(index, 3)
        torch.testing.assert_close(
            patches[:, index], image[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
        )


def test_rotation_labels_follow_the_rotation() -> None:
    """A rotation head that has learnt its task tells the four rotations of a new image apart."""
    method = small_method("rotation")
    optimizer = torch.optim.Adam(method.parameters(), lr=3e-3)
    digits = torch.zeros(4, 1, 28, 28)
    digits[:, :, 4:24, 10:14] = 1.0  # an upright bar with a foot: no rotation symmetry
    digits[:, :, 20:24, 14:22] = 1.0
    for _ in range(30):
        loss = method([digits])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    method.eval()
    with torch.no_grad():
        rotated = torch.cat([torch.rot90(digits[:1], k, dims=(2, 3)) for k in range(4)])
        predicted = method.head(method.backbone(rotated)).argmax(1)
    assert predicted.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["byol", "moco", "dino"])
def test_asymmetric_views_take_each_views_blur_and_solarize_from_the_method_params(name: str) -> None:
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    aug = AugmentParams(blur_p=0.5, solarize_p=0.5)  # the symmetric methods' setting: not these
    method = small_method(name, view_blur_p=(0.0, 1.0), view_solarize_p=(1.0, 0.0))
    views = method.make_views(x, aug, torch.Generator().manual_seed(1))
    if name == "dino":
        aug = dataclasses.replace(aug, crop_scale=method.params.global_crop_scale)
    g = torch.Generator().manual_seed(1)
    first = augment(x, dataclasses.replace(aug, blur_p=0.0, solarize_p=1.0), g)
    second = augment(x, dataclasses.replace(aug, blur_p=1.0, solarize_p=0.0), g)
    assert torch.equal(views[0], first) and torch.equal(views[1], second)


def test_dino_exports_its_teacher_and_other_methods_their_backbone(tmp_path: Path) -> None:
    """DINO is evaluated (and released) as its teacher: the pipeline's encoder file holds the teacher."""
    cfg = load_config(REPO / "params.yaml", "smoke", ["pretrain.method=dino"])
    dino = small_method("dino")
    with torch.no_grad():  # a teacher unlike its student, as after any training
        for p in dino.teacher_backbone.parameters():
            p.add_(1.0)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": dino.state_dict(), "config": cfg.model_dump(mode="json")}, checkpoint)
    encoder = torch.load(encoder_from_checkpoint(cfg, checkpoint), weights_only=True)
    teacher, student = dino.teacher_backbone.state_dict(), dino.backbone.state_dict()
    assert encoder.keys() == teacher.keys()
    assert all(torch.equal(encoder[k], teacher[k]) for k in teacher)
    assert not all(torch.equal(encoder[k], student[k]) for k in student)
    simclr = load_config(REPO / "params.yaml", "smoke", ["pretrain.method=simclr"])
    with pytest.raises(ValueError, match=r"pretrain\.method: the pretraining run used 'dino'"):
        encoder_from_checkpoint(simclr, checkpoint)
