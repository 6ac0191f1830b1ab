import pytest

from tasks.evaluate import (
    CellResult,
    LabelBudget,
    LabelEfficiency,
    PairedGain,
    metric_name,
    wilson_lower_bound,
)

ONE_PCT = LabelBudget(fraction=0.01)


def cell(protocol: str, fraction: float, *accuracies: float) -> CellResult:
    seeds = tuple(range(len(accuracies)))
    budget = LabelBudget(fraction=fraction)
    return CellResult(protocol, budget, round(fraction * 60000), {}, seeds, accuracies, accuracies)


def test_budget_and_metric_names() -> None:
    assert metric_name("knn", ONE_PCT) == "knn_top1_1pct"
    assert metric_name("linear", LabelBudget(fraction=1.0)) == "linear_top1_100pct"
    assert metric_name("linear", LabelBudget(fraction=0.005)) == "linear_top1_0_5pct"
    ten = LabelBudget(per_class=10)
    assert metric_name("finetune", ten) == "finetune_top1_10_per_class"
    assert (str(ten), ten.phrase, ONE_PCT.phrase) == ("10 a class", "10 labels a class", "1% of the labels")
    # Labels per class first (the scarce ones), then fractions.
    assert sorted([LabelBudget(fraction=0.1), ONE_PCT, ten], key=LabelBudget.sort_key) == [
        ten,
        ONE_PCT,
        LabelBudget(fraction=0.1),
    ]


def test_gain_over_supervised_only_where_both_were_measured() -> None:
    evaluation = LabelEfficiency(
        (
            cell("finetune", 0.01, 0.83),
            cell("supervised", 0.01, 0.80),
            cell("linear", 0.01, 0.79),
            cell("linear", 1.0, 0.86),
        )
    )
    gains = evaluation.gains_over_supervised("finetune")
    assert (
        list(gains) == [ONE_PCT]
        and abs(gains[ONE_PCT].mean - 0.03) < 1e-9
        and gains[ONE_PCT].interval is None
    )
    assert abs(evaluation.gains_over_supervised("linear")[ONE_PCT].mean + 0.01) < 1e-9
    metrics = evaluation.metrics()
    assert metrics["linear_top1_100pct"] == 0.86
    assert abs(metrics["gain_linear_vs_supervised_1pct"] + 0.01) < 1e-9
    assert "gain_linear_vs_supervised_100pct" not in metrics


def test_a_cell_reports_mean_and_sample_std_over_its_seeds() -> None:
    three = cell("finetune", 0.1, 0.80, 0.82, 0.84)
    assert abs(three.mean - 0.82) < 1e-9 and abs(three.std - 0.02) < 1e-9
    assert cell("knn", 0.1, 0.75).std == 0.0
    point = LabelEfficiency((three,)).curve()[0]
    assert (point["n"], point["mean"], point["std"]) == (3, three.mean, three.std)


def test_a_gain_pairs_the_seeds_and_has_a_student_t_interval() -> None:
    ours = CellResult("finetune", ONE_PCT, 600, {}, (0, 1, 2, 3), (0.83, 0.85, 0.84, 0.90), (0.0,) * 4)
    # The baseline's seeds in another order, and seed 3 missing: pairs are by seed, 3 is left out.
    baseline = CellResult("supervised", ONE_PCT, 600, {}, (2, 0, 1), (0.82, 0.80, 0.81), (0.0,) * 3)
    gain = PairedGain.of(ours, baseline)
    assert gain.seeds == (0, 1, 2) and gain.mean == pytest.approx(0.03)
    # Differences 0.03, 0.04, 0.02: sd 0.01, t(0.975, 2 df) = 4.3027.
    half = 4.302653 * 0.01 / 3**0.5
    assert gain.interval == pytest.approx((0.03 - half, 0.03 + half))
    metrics = LabelEfficiency((ours, baseline)).metrics()
    assert metrics["gain_finetune_vs_supervised_1pct_ci_low"] == pytest.approx(0.03 - half)
    with pytest.raises(ValueError, match="share no seed"):
        PairedGain.of(ours, CellResult("supervised", ONE_PCT, 600, {}, (9,), (0.8,), (0.0,)))


def test_a_perfect_score_on_20_labels_is_less_assured_than_85_percent_on_12000() -> None:
    """What picks the registered model across cells whose selection labels differ in number."""
    assert wilson_lower_bound(1.0, 20) == pytest.approx(0.8389, abs=1e-4)  # 20 / (20 + 1.96^2)
    assert wilson_lower_bound(0.85, 12000) == pytest.approx(0.8435, abs=1e-4)
    assert wilson_lower_bound(0.5, 100) < 0.5 < wilson_lower_bound(0.5, 10**9) + 1e-4
