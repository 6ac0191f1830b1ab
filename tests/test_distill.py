import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssl_models import Encoder, create_backbone
from ssl_models.augment import AugmentParams
from ssl_models.data import load_fashion_mnist
from ssl_models.distill import (
    DistillSettings,
    count_parameters,
    distill,
    images_per_second,
    random_batches,
    student_classifier,
)
from ssl_models.evaluate import accuracy, classify, finetune
from ssl_models.losses import distillation_loss
from ssl_models.train import TrainSettings

AUG = AugmentParams(crop_scale=(0.5, 1.0), jitter_p=0.0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small batches gain little from a second thread, and on a shared 2-core machine OpenMP's
    spin-waiting made this test 30 times slower (1.5 s alone, 50 s beside another job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_distillation_loss_is_zero_for_identical_logits() -> None:
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    assert distillation_loss(logits, logits.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_matches_hand_computed_kl(temperature: float) -> None:
    # Teacher logits (T ln 3, 0) soften to p = (3/4, 1/4) at T; equal student logits give q = (1/2, 1/2).
    teacher = torch.tensor([[temperature * math.log(3), 0.0]])
    student = torch.zeros(1, 2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    loss = distillation_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(temperature**2 * kl, abs=1e-6)


def test_distillation_loss_matches_kl_of_softened_distributions_over_a_batch() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 3, 4.0
    p, q = F.softmax(teacher / t, dim=1), F.softmax(student / t, dim=1)
    expected = t**2 * (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, t), expected)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_distillation_gradient_is_scaled_by_t_squared_and_spares_the_teacher(temperature: float) -> None:
    g = torch.Generator().manual_seed(1)
    student = torch.randn(6, 5, generator=g).requires_grad_()
    teacher = torch.randn(6, 5, generator=g).requires_grad_()
    distillation_loss(student, teacher, temperature).backward()
    # d/ds of T^2 KL = T^2 * (q - p) / (T N): the soft targets' 1/T^2 is compensated once.
    expected = temperature * (F.softmax(student / temperature, 1) - F.softmax(teacher / temperature, 1)) / 6
    torch.testing.assert_close(student.grad, expected.detach())
    assert teacher.grad is None


def test_distillation_loss_rejects_mismatched_logits() -> None:
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.usefixtures("one_thread")
def test_distill_increases_agreement_with_the_teacher(fashion_mnist_dir: Path) -> None:
    train, _ = load_fashion_mnist(fashion_mnist_dir)
    assert train.labels is not None
    images, labels = train.images[:1000], train.labels[:1000]
    held_out = train.images[1000:1500]
    torch.manual_seed(0)
    teacher = finetune(
        Encoder(create_backbone("small_cnn"), 0.29, 0.35),
        images,
        labels,
        10,
        AUG,
        TrainSettings(batch_size=64, lr=3e-3),
        steps=30,
    )
    student = student_classifier(Encoder(create_backbone("tiny_cnn"), 0.29, 0.35), 10, seed=0)
    teacher_predictions = classify(teacher, held_out)
    before = accuracy(classify(student, held_out), teacher_predictions)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    trained = distill(
        teacher,
        student,
        random_batches(images, 64, seed=0),
        AUG,
        DistillSettings(temperature=2.0, train=TrainSettings(batch_size=64, lr=3e-3)),
        steps=30,
    )
    after = accuracy(classify(trained, held_out), teacher_predictions)
    assert after > max(0.6, before + 0.3), (before, after)
    assert not trained.training
    # The teacher is left untouched, and distill trains a copy of the student.
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_state[key])
    assert not torch.equal(trained[1].weight, student[1].weight)


def test_labeled_weight_needs_labeled_data_and_changes_the_result(images: torch.Tensor) -> None:
    teacher = student_classifier(Encoder(create_backbone("tiny_cnn"), 0.5, 0.25), 3, seed=1)
    student = student_classifier(Encoder(create_backbone("tiny_cnn"), 0.5, 0.25), 3, seed=0)
    train = TrainSettings(batch_size=16)
    with pytest.raises(ValueError, match=r"labeled_weight=0\.5 needs labeled"):
        distill(
            teacher, student, iter([images]), AUG, DistillSettings(labeled_weight=0.5, train=train), steps=2
        )
    labeled = (images[:16], torch.arange(16) % 3)
    heads = [
        distill(
            teacher,
            student,
            random_batches(images, 16, 0),
            AUG,
            DistillSettings(labeled_weight=w, train=train),
            2,
            labeled,
        )[1]
        for w in (0.0, 0.5)
    ]
    assert not torch.allclose(heads[0].weight, heads[1].weight)


def test_count_parameters_and_images_per_second(images: torch.Tensor) -> None:
    small = student_classifier(Encoder(create_backbone("small_cnn"), 0.5, 0.25), 10, seed=0)
    tiny = student_classifier(Encoder(create_backbone("tiny_cnn"), 0.5, 0.25), 10, seed=0)
    linear = torch.nn.Linear(4, 3)
    assert count_parameters(linear) == 4 * 3 + 3
    # tiny_cnn halves every width: about a quarter of small_cnn's parameters.
    assert 0.2 < count_parameters(tiny) / count_parameters(small) < 0.3
    assert images_per_second(tiny, images, batch_size=16) > 0
    assert not tiny.training
