import pytest
import torch

from ssl_models import Encoder, create_backbone
from ssl_models.augment import AugmentParams
from ssl_models.evaluate import (
    LinearProbeSettings,
    accuracy,
    classify,
    extract_features,
    finetune,
    knn_predict,
    linear_probe,
)
from ssl_models.train import TrainSettings


def clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, 16) * 5
    labels = torch.randint(3, (n,), generator=g)
    return centres[labels] + torch.randn(n, 16, generator=g) * 0.5, labels


def test_knn_separates_clusters_and_weights_by_similarity() -> None:
    train_x, train_y = clusters(90, 0)
    test_x, test_y = clusters(30, 1)
    assert accuracy(knn_predict(train_x, train_y, test_x, 3, k=10), test_y) == 1.0
    # One very close neighbour of class 1 outweighs two distant ones of class 0 at low T.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    pred = knn_predict(bank, torch.tensor([1, 0, 0]), torch.tensor([[1.0, 0.05]]), 2, k=3, temperature=0.05)
    assert pred.tolist() == [1]


def test_linear_probe_learns_and_folds_standardisation() -> None:
    train_x, train_y = clusters(300, 0)
    test_x, test_y = clusters(100, 1)
    train_x, test_x = train_x * 7 + 3, test_x * 7 + 3  # unnormalised features
    head = linear_probe(train_x, train_y, 3, LinearProbeSettings(steps=200))
    with torch.no_grad():
        assert accuracy(head(test_x).argmax(1), test_y) > 0.95


def test_extract_features_uses_eval_mode_and_restores_it() -> None:
    encoder = Encoder(create_backbone("small_cnn"), 0.5, 0.25)
    images = torch.randint(0, 255, (10, 1, 28, 28), dtype=torch.uint8)
    feats = extract_features(encoder, images, batch_size=3)
    assert feats.shape == (10, encoder.num_features) and encoder.training
    torch.testing.assert_close(feats[:1], extract_features(encoder, images[:1]))


def test_finetune_fits_a_small_labeled_set() -> None:
    torch.manual_seed(0)
    # Two classes that differ in brightness: easy for any encoder after a few steps.
    images = torch.cat([torch.full((16, 1, 28, 28), 40), torch.full((16, 1, 28, 28), 220)]).to(torch.uint8)
    labels = torch.tensor([0] * 16 + [1] * 16)
    encoder = Encoder(create_backbone("small_cnn"), 0.5, 0.25)
    model = finetune(
        encoder,
        images,
        labels,
        2,
        AugmentParams(jitter_p=0.0),
        TrainSettings(batch_size=16, lr=1e-2),
        steps=30,
    )
    assert accuracy(classify(model, images), labels) == 1.0
    # The encoder passed in is left untouched.
    assert not any(
        torch.equal(a, b)
        for a, b in zip(encoder.parameters(), model[0].parameters(), strict=True)
        if a.ndim > 1
    )


def test_accuracy() -> None:
    assert accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == pytest.approx(0.5)


def test_finetune_and_probe_do_not_depend_on_global_rng_state() -> None:
    images = torch.randint(0, 255, (16, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(16) % 2
    settings = TrainSettings(batch_size=8)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(0)
        encoder = Encoder(create_backbone("small_cnn"), 0.5, 0.25)
        torch.manual_seed(global_seed)  # what ran before differs
        model = finetune(encoder, images, labels, 2, AugmentParams(), settings, steps=2)
        head = linear_probe(
            torch.randn(16, 4, generator=torch.Generator().manual_seed(0)),
            labels,
            2,
            LinearProbeSettings(steps=2),
        )
        results.append((model[1].weight.detach().clone(), head.weight.detach().clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
