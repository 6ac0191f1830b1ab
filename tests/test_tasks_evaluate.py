from tasks.evaluate import CellResult, LabelEfficiency, metric_name


def cell(protocol: str, fraction: float, *accuracies: float) -> CellResult:
    seeds = tuple(range(len(accuracies)))
    return CellResult(protocol, fraction, round(fraction * 60000), {}, seeds, accuracies, accuracies)


def test_metric_names() -> None:
    assert metric_name("knn", 0.01) == "knn_top1_1pct"
    assert metric_name("linear", 1.0) == "linear_top1_100pct"
    assert metric_name("linear", 0.005) == "linear_top1_0_5pct"


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
    assert list(gains) == [0.01] and abs(gains[0.01] - 0.03) < 1e-9
    assert abs(evaluation.gains_over_supervised("linear")[0.01] + 0.01) < 1e-9
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
