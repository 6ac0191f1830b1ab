import math

import pytest
import torch

from ssl_models.losses import barlow_twins_loss, byol_loss, negative_cosine, nt_xent, vicreg_loss


def test_nt_xent_matches_hand_computed_value() -> None:
    # Unit vectors, tau = 1: the similarities are 1, 0 or -1, so each row's loss is
    # -sim(positive) + log(sum over the other three of exp(sim)).
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    e = math.e
    rows = [
        -1 + math.log(1 + e + 1 / e),  # z1[0]: positive z2[0] (1); others z1[1] (0), z2[1] (-1)
        0 + math.log(3),  # z1[1]: positive z2[1] (0); others z1[0] (0), z2[0] (0)
        -1 + math.log(1 + e + 1 / e),  # z2[0]: positive z1[0] (1); others z1[1] (0), z2[1] (-1)
        0 + math.log(1 + 2 / e),  # z2[1]: positive z1[1] (0); others z1[0] (-1), z2[0] (-1)
    ]
    assert nt_xent(z1, z2, temperature=1.0).item() == pytest.approx(sum(rows) / 4, abs=1e-6)


def test_nt_xent_temperature_and_scale_invariance() -> None:
    z1 = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    z2 = torch.tensor([[2.0, 0.0], [-4.0, 0.0]])
    tau = 0.5
    e2, e_2 = math.exp(2), math.exp(-2)
    expected = (2 * (-2 + math.log(1 + e2 + e_2)) + math.log(3) + math.log(1 + 2 * e_2)) / 4
    assert nt_xent(z1, z2, temperature=tau).item() == pytest.approx(expected, abs=1e-6)


def test_nt_xent_rejects_mismatched_views() -> None:
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.ones(2, 3), torch.ones(3, 3))


def test_byol_loss_matches_hand_computed_value() -> None:
    prediction = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 5.0], [2.0, 2.0]])
    # cos = 0 -> 2 - 0 = 2; cos = 1 -> 0; mean 1.
    assert byol_loss(prediction, target).item() == pytest.approx(1.0, abs=1e-6)


def test_byol_loss_sends_no_gradient_to_target() -> None:
    prediction = torch.randn(4, 8, requires_grad=True)
    target = torch.randn(4, 8, requires_grad=True)
    byol_loss(prediction, target).backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert target.grad is None


def test_negative_cosine_matches_hand_computed_value_and_stops_gradient() -> None:
    prediction = torch.tensor([[1.0, 0.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, 2.0], [3.0, 4.0]], requires_grad=True)
    loss = negative_cosine(prediction, target)
    assert loss.item() == pytest.approx(-(0.0 + 1.0) / 2, abs=1e-6)
    loss.backward()
    assert target.grad is None


# Two columns with zero mean, unit (biased) variance and zero correlation.
WHITE = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])


def test_barlow_twins_matches_hand_computed_values() -> None:
    # Identical views: C = I, so both terms vanish.
    assert barlow_twins_loss(WHITE, WHITE).item() == pytest.approx(0.0, abs=1e-4)
    # Opposite views: C = -I, each diagonal term (1 - (-1))^2 = 4, two of them.
    assert barlow_twins_loss(WHITE, -WHITE).item() == pytest.approx(8.0, abs=1e-3)
    # Second view with its columns swapped: C = [[0, 1], [1, 0]]: 2 * 1 + lambda * 2 * 1.
    swapped = WHITE[:, [1, 0]]
    assert barlow_twins_loss(WHITE, swapped, lambda_offdiag=0.5).item() == pytest.approx(3.0, abs=1e-3)


def test_vicreg_matches_hand_computed_values() -> None:
    # Unbiased std of each column is sqrt(4/3) > 1 (no variance penalty), covariance is 0.
    assert vicreg_loss(WHITE, WHITE).item() == pytest.approx(0.0, abs=1e-6)
    # Shifting one view by 1 costs invariance only: 25 * mean((1)^2) = 25.
    assert vicreg_loss(WHITE, WHITE + 1).item() == pytest.approx(25.0, abs=1e-5)
    # A collapsed view (all zeros): variance 25 * (0 + (1 - sqrt(1e-4))) / 2 = 12.375 (the branches'
    # mean), invariance 25 * 1.
    collapsed = torch.zeros(4, 2)
    assert vicreg_loss(WHITE, collapsed).item() == pytest.approx(25.0 + 12.375, abs=1e-4)
    # Perfectly correlated columns: Cov = [[4/3, 4/3], [4/3, 4/3]], c = 2 * (4/3)^2 / 2 per view.
    correlated = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    expected = 2 * (16 / 9)
    assert vicreg_loss(correlated, correlated).item() == pytest.approx(expected, abs=1e-5)


def test_vicreg_equals_lightly_and_the_authors_loss_in_float64() -> None:
    from lightly.loss import VICRegLoss

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(64, 32, generator=g, dtype=torch.float64), torch.randn(64, 32, generator=g)
    z2 = (0.3 * z2.double() + 0.5 * z1)[:, torch.randperm(32, generator=g)] * 0.2  # some variance < 1
    theirs = VICRegLoss()(z1, z2).item()
    assert vicreg_loss(z1.float(), z2.float()).item() == pytest.approx(theirs, rel=1e-5)


@pytest.mark.parametrize("loss", [barlow_twins_loss, vicreg_loss])
def test_correlation_losses_run_in_fp32_under_bf16_autocast(loss) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(256, 512, generator=g), torch.randn(256, 512, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(z1.bfloat16(), z2.bfloat16())
    assert under_autocast.dtype == torch.float32
    in_fp32 = loss(z1.bfloat16().float(), z2.bfloat16().float())
    assert under_autocast.item() == pytest.approx(in_fp32.item(), rel=1e-6)
