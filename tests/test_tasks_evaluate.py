from tasks.evaluate import EvalRow, EvaluationOutput, metric_name


def output(*rows: EvalRow) -> EvaluationOutput:
    return EvaluationOutput(rows, ("a", "b"))


def test_metric_names() -> None:
    assert metric_name("knn", 0.01) == "knn_top1_1pct"
    assert metric_name("linear", 1.0) == "linear_top1_100pct"
    assert metric_name("linear", 0.005) == "linear_top1_0_5pct"


def test_gain_over_supervised_only_where_both_were_measured() -> None:
    evaluation = output(
        EvalRow("finetune", 0.01, 600, 0.83),
        EvalRow("supervised", 0.01, 600, 0.80),
        EvalRow("linear", 0.01, 600, 0.79),
        EvalRow("linear", 1.0, 60000, 0.86),
    )
    gains = evaluation.gains_over_supervised("finetune")
    assert list(gains) == [0.01] and abs(gains[0.01] - 0.03) < 1e-9
    assert abs(evaluation.gains_over_supervised("linear")[0.01] + 0.01) < 1e-9
    metrics = evaluation.metrics("linear")
    assert metrics["linear_top1_100pct"] == 0.86
    assert abs(metrics["gain_linear_vs_supervised_1pct"] + 0.01) < 1e-9
    assert "gain_linear_vs_supervised_100pct" not in metrics
