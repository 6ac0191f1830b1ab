"""The promotion gate and the registry moves, against a real MLflow registry (SQLite in tmp_path)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy.stats import binom

from tasks import registry
from tasks.config import PipelineConfig, PromotionConfig
from tasks.data import DatasetRef
from tasks.promotion import (
    Decision,
    HeldOutPredictions,
    McNemar,
    ModelEvaluation,
    decide,
    evaluate_predictions,
    weights_sha256,
)
from tasks.registry import PromotionError
from tasks.tracking import client_for

CLASSES = ("shirt", "shoe", "bag")
TEST_SET = "a" * 64
POLICY = PromotionConfig(margin=0.002, class_tolerance=0.02, confidence=0.95)
PER_CLASS = 1000  # test images of each class
TEST_REF = DatasetRef("test", "unused", TEST_SET, PER_CLASS * len(CLASSES), CLASSES, dvc_md5="dvcmd5.dir")


@dataclass(frozen=True)
class Scored:
    """A model as the gate sees it: its evaluation (the version's tags) and its test predictions."""

    evaluation: ModelEvaluation
    predictions: HeldOutPredictions


def scored(
    accuracy: float,
    per_class: tuple[float, ...] | None = None,
    test: str = TEST_SET,
    offset: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> Scored:
    """A model right on images ``offset`` to ``offset + accuracy * PER_CLASS`` of each class (counted
    round the class): two models with different offsets disagree on about ``2 * offset`` images a class."""
    per_class = per_class or (accuracy,) * len(classes)
    labels = torch.arange(len(classes)).repeat_interleave(PER_CLASS)
    correct = torch.zeros(len(labels), dtype=torch.bool)
    for c, acc in enumerate(per_class):
        correct[c * PER_CLASS + (offset + torch.arange(round(acc * PER_CLASS))) % PER_CLASS] = True
    predictions = torch.where(correct, labels, (labels + 1) % len(classes))
    counts = {name: correct[labels == c].float().mean().item() for c, name in enumerate(classes)}
    evaluation = ModelEvaluation(test, "dvcmd5.dir", len(labels), correct.float().mean().item(), counts)
    return Scored(evaluation, HeldOutPredictions(labels, predictions, classes))


def gate(challenger: Scored, champion: Scored, policy: PromotionConfig = POLICY) -> Decision:
    return decide(
        challenger.evaluation,
        champion.evaluation,
        "1",
        policy,
        (challenger.predictions, champion.predictions),
    )


# The gate, as a function.


def test_no_champion_promotes_and_missing_metrics_or_predictions_never_do() -> None:
    assert decide(scored(0.5).evaluation, None, None, POLICY).promote
    assert not decide(None, scored(0.5).evaluation, "1", POLICY).promote
    missing = decide(scored(0.9).evaluation, None, "1", POLICY)
    assert not missing.promote and "no test metrics" in missing.reason
    unpaired = decide(scored(0.9).evaluation, scored(0.5).evaluation, "1", POLICY)
    assert not unpaired.promote and "test predictions are not saved" in unpaired.reason


@pytest.mark.parametrize(
    ("challenger", "promote", "words"),
    [
        (0.800, False, "a tie"),
        (0.790, False, "below the margin"),
        (0.801, False, "below the margin"),  # +0.1 points < margin of 0.2
        (0.803, True, "+0.30 points"),  # 9 images gained, none lost: p = 0.5 ** 9
    ],
)
def test_accuracy_must_rise_by_the_margin(challenger: float, promote: bool, words: str) -> None:
    decision = gate(scored(challenger), scored(0.800))
    assert decision.promote is promote
    assert words in decision.reason


def test_a_tie_never_promotes_even_with_no_margin() -> None:
    assert not gate(scored(0.8), scored(0.8), PromotionConfig(margin=0.0)).promote


def test_a_gain_within_the_noise_of_10000_images_is_not_promoted() -> None:
    """+0.1 points on 10,000 test images, the two models disagreeing on 6% of them (as two
    Fashion-MNIST models at 85% do): 310 images gained against 300 lost is chance; +2 points is not."""
    classes = tuple(f"class{i}" for i in range(10))
    champion = scored(0.850, classes=classes)
    policy = PromotionConfig(margin=0.0)
    noise = gate(scored(0.851, offset=30, classes=classes), champion, policy)
    assert not noise.promote
    assert noise.paired is not None and (noise.paired.gained, noise.paired.lost) == (310, 300)
    assert noise.p_value == pytest.approx(binom.sf(309, 610, 0.5))
    assert "not better with 95% confidence" in noise.reason and "310 images gained, 300 lost" in noise.reason
    better = gate(scored(0.870, offset=30, classes=classes), champion, policy)
    assert better.promote and better.paired == McNemar(500, 300) and better.p_value < 1e-12
    # A lower confidence lets the same +0.1 points through.
    assert gate(
        scored(0.851, offset=30, classes=classes), champion, PromotionConfig(margin=0.0, confidence=0.6)
    ).promote


def test_a_class_that_regresses_beyond_the_tolerance_blocks_promotion() -> None:
    champion = scored(0.80, (0.80, 0.80, 0.80))
    within = gate(scored(0.82, (0.79, 0.85, 0.82)), champion)
    assert within.promote
    beyond = gate(scored(0.82, (0.77, 0.87, 0.82)), champion)
    assert not beyond.promote
    assert beyond.regressions == {"shirt": pytest.approx(0.03, abs=1e-6)}
    assert "'shirt' loses 3.00 points" in beyond.reason
    # The same 3 points lost where the two models disagree on 37% of the shirts: 200 shirts lost
    # against 170 gained is not a loss with 95% confidence.
    noisy = gate(scored(0.82, (0.77, 0.87, 0.82), offset=200), champion)
    assert noisy.promote and noisy.regressions == {}


def test_different_test_sets_or_labels_refuse_to_compare() -> None:
    decision = decide(scored(0.95, test="b" * 64).evaluation, scored(0.80).evaluation, "1", POLICY)
    assert not decision.promote
    assert "different test sets" in decision.reason and "bbbbbbbbbbbb" in decision.reason
    other_dvc = ModelEvaluation(TEST_SET, "other.dir", 3000, 0.95, dict.fromkeys(CLASSES, 0.95))
    assert not decide(other_dvc, scored(0.80).evaluation, "1", POLICY).promote
    champion, challenger = scored(0.80), scored(0.95)
    relabelled = HeldOutPredictions(
        champion.predictions.labels.roll(1), champion.predictions.predictions, CLASSES
    )
    refused = gate(challenger, Scored(champion.evaluation, relabelled))
    assert not refused.promote and "saved test labels differ" in refused.reason


def test_saved_predictions_round_trip_and_evaluate_as_the_tags_say(tmp_path: Path) -> None:
    model = scored(0.8123, (0.7, 0.9, 0.8369))
    model.predictions.save(tmp_path / HeldOutPredictions.FILE)
    loaded = HeldOutPredictions.load(tmp_path / HeldOutPredictions.FILE)
    assert loaded.classes == CLASSES and torch.equal(loaded.correct, model.predictions.correct)
    assert (
        evaluate_predictions(loaded.labels, loaded.predictions, loaded.classes, TEST_REF) == model.evaluation
    )


def test_evaluation_round_trips_through_version_tags() -> None:
    original = scored(0.8123, (0.7, 0.9, 0.8369)).evaluation
    assert ModelEvaluation.from_tags(original.tags()) == original
    broken = original.tags() | {"eval.class_accuracy": "{not json"}
    assert ModelEvaluation.from_tags(broken) is None


def test_weights_digest_follows_values_not_files(tmp_path: Path) -> None:
    import torch

    state = {"0.weight": torch.arange(6.0).reshape(2, 3), "1.bias": torch.zeros(2)}
    torch.save(state, tmp_path / "a.pt")
    torch.save(dict(reversed(state.items())), tmp_path / "b.pt")
    state["1.bias"][0] = 1e-7
    torch.save(state, tmp_path / "c.pt")
    a, b, c = (weights_sha256(tmp_path / f"{n}.pt") for n in "abc")
    assert a == b != c


# The registry, real MLflow on SQLite.


@pytest.fixture
def cfg(tmp_path: Path) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"workspace": str(tmp_path / "ws"), "tracking": {"registered_model": "fashion"}}
    )


def log_predictions(client: MlflowClient, run_id: str, model: Scored, folder: Path) -> None:
    """The run's test predictions, where the sweep logs them and the gate reads them."""
    model.predictions.save(folder / HeldOutPredictions.FILE)
    client.log_artifact(run_id, str(folder / HeldOutPredictions.FILE), HeldOutPredictions.ARTIFACT_DIR)


def new_challenger(
    cfg: PipelineConfig, model: Scored, weights: str | None = None
) -> registry.PromotionOutcome:
    """A run with a (small, real) artifact registered through the gate, as the pipeline does."""
    client = client_for(cfg)
    experiment = client.get_experiment_by_name("gate")
    # A local store keeps artifacts in the workspace; a server stores them where it is configured to.
    artifacts = None if cfg.tracking.tracking_uri else (Path(cfg.workspace) / "artifacts").resolve().as_uri()
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("gate", artifacts)
    run = client.create_run(experiment_id)
    folder = Path(cfg.workspace) / run.info.run_id
    folder.mkdir(parents=True)
    ev = model.evaluation
    (folder / "weights.txt").write_text(str(ev.accuracy))
    client.log_artifact(run.info.run_id, str(folder / "weights.txt"), "model")
    log_predictions(client, run.info.run_id, model, folder)
    client.set_terminated(run.info.run_id)
    tags = {"data.test.sha256": ev.test_sha256, "sweep.best_cell": "finetune-10pct"}
    return registry.register_challenger(
        cfg, f"runs:/{run.info.run_id}/model", run.info.run_id, tags, ev, weights or run.info.run_id
    )


def snapshot(cfg: PipelineConfig) -> dict[str, Any]:
    """Everything a promotion may change: versions with tags and descriptions, and the aliases."""
    client = client_for(cfg)
    name = cfg.tracking.registered_model
    try:
        aliases = dict(client.get_registered_model(name).aliases)
    except Exception:
        return {"model": None}
    return {
        "aliases": aliases,
        "versions": {
            str(v.version): (dict(v.tags), v.description)
            for v in client.search_model_versions(f"name='{name}'")
        },
    }


def aliases(cfg: PipelineConfig) -> dict[str, str]:
    model = client_for(cfg).get_registered_model(cfg.tracking.registered_model)
    return {a: str(v) for a, v in model.aliases.items()}


def test_first_version_becomes_champion_a_worse_one_stays_challenger(cfg: PipelineConfig) -> None:
    first = new_challenger(cfg, scored(0.80))
    assert (first.version, first.decision.outcome, first.champion) == ("1", "promoted", "1")
    assert aliases(cfg) == {"champion": "1", "challenger": "1"}

    worse = new_challenger(cfg, scored(0.78))
    assert (worse.version, worse.decision.outcome, worse.champion) == ("2", "rejected", "1")
    assert aliases(cfg) == {"champion": "1", "challenger": "2"}

    client = client_for(cfg)
    v2 = client.get_model_version("fashion", "2")
    assert v2.tags["promotion.outcome"] == "rejected"
    assert v2.tags["promotion.compared_with"] == "1"
    assert float(v2.tags["promotion.delta"]) == pytest.approx(-0.02)
    assert "below the margin" in v2.tags["promotion.reason"] and "below the margin" in v2.description
    report_path = client.download_artifacts(v2.run_id, "promotion/version-2.json", str(Path(cfg.workspace)))
    report = json.loads(Path(report_path).read_text())
    assert report["outcome"] == "rejected" and report["champion_version"] == "1"
    assert report["challenger"]["accuracy"] == pytest.approx(0.78) and report["champion"][
        "accuracy"
    ] == pytest.approx(0.80)


def test_a_better_one_is_promoted_and_rollback_restores_the_previous_champion(cfg: PipelineConfig) -> None:
    new_challenger(cfg, scored(0.80))
    better = new_challenger(cfg, scored(0.83))
    assert (better.decision.outcome, better.champion) == ("promoted", "2")
    assert aliases(cfg) == {"champion": "2", "challenger": "2", "previous-champion": "1"}
    best = new_challenger(cfg, scored(0.86))
    assert aliases(cfg) == {"champion": "3", "challenger": "3", "previous-champion": "2"}
    assert client_for(cfg).get_model_version("fashion", "3").tags["promotion.previous_champion"] == "2"

    back = registry.rollback(cfg, "bad outputs in production")
    assert (back.demoted, back.champion, back.previous_champion) == ("3", "2", "1")
    assert aliases(cfg) == {"champion": "2", "challenger": "3", "previous-champion": "1"}
    v3 = client_for(cfg).get_model_version("fashion", "3")
    assert v3.tags["rollback.reason"] == "bad outputs in production" and v3.tags["rollback.to_version"] == "2"
    assert registry.rollback(cfg, "again").champion == "1"
    assert aliases(cfg) == {"champion": "1", "challenger": "3"}
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        registry.rollback(cfg, "once more")
    assert best.version == "3"


def test_tie_regression_and_other_test_set_are_registered_but_not_promoted(cfg: PipelineConfig) -> None:
    new_challenger(cfg, scored(0.80, (0.80, 0.80, 0.80)))
    tie = new_challenger(cfg, scored(0.80, (0.80, 0.80, 0.80)))
    regression = new_challenger(cfg, scored(0.85, (0.70, 0.95, 0.90)))
    elsewhere = new_challenger(cfg, scored(0.95, test="b" * 64))
    assert [o.decision.outcome for o in (tie, regression, elsewhere)] == ["rejected"] * 3
    assert "a tie" in tie.decision.reason
    assert "'shirt' loses 10.00 points" in regression.decision.reason
    assert "different test sets" in elsewhere.decision.reason
    assert aliases(cfg) == {"champion": "1", "challenger": "4"}


def test_same_weights_are_not_registered_twice(cfg: PipelineConfig) -> None:
    new_challenger(cfg, scored(0.80), weights="f" * 64)
    again = new_challenger(cfg, scored(0.80), weights="f" * 64)
    assert not again.registered and again.version == "1"
    assert "already holds these weights" in again.summary()
    assert len(client_for(cfg).search_model_versions("name='fashion'")) == 1


def test_promote_by_hand_needs_the_gate_or_a_reason(cfg: PipelineConfig) -> None:
    new_challenger(cfg, scored(0.80))
    new_challenger(cfg, scored(0.79))
    refused = registry.promote(cfg, "2")
    assert not refused.decision.promote and aliases(cfg)["champion"] == "1"
    with pytest.raises(PromotionError, match="--force needs --reason"):
        registry.promote(cfg, "2", force=True)
    forced = registry.promote(cfg, "2", force=True, reason="the champion misreads new scanners")
    assert forced.decision.outcome == "forced" and aliases(cfg)["champion"] == "2"
    tags = client_for(cfg).get_model_version("fashion", "2").tags
    assert tags["promotion.outcome"] == "forced" and "new scanners" in tags["promotion.reason"]
    with pytest.raises(PromotionError, match="already the champion"):
        registry.promote(cfg, "2")
    with pytest.raises(PromotionError, match="has no version 9"):
        registry.promote(cfg, "9")


class FailingClient:
    """An MlflowClient whose ``fail_at``-th registry write (or artifact upload) raises."""

    WRITES = (
        "create_registered_model",
        "create_model_version",
        "set_registered_model_alias",
        "delete_registered_model_alias",
        "set_model_version_tag",
        "update_model_version",
        "log_artifact",
    )

    def __init__(self, client: MlflowClient, fail_at: int):
        self._client = client
        self.fail_at = fail_at
        self.writes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in self.WRITES:
            return attr

        def write(*args: Any, **kwargs: Any) -> Any:
            self.writes.append(name)
            if len(self.writes) == self.fail_at:
                raise ConnectionError(f"injected failure in {name}")
            return attr(*args, **kwargs)

        return write


@pytest.mark.parametrize("history", ["empty", "with champion"])
def test_a_failure_at_any_step_before_the_alias_move_leaves_the_registry_unchanged(
    cfg: PipelineConfig, monkeypatch: pytest.MonkeyPatch, history: str
) -> None:
    if history == "with champion":
        new_challenger(cfg, scored(0.80))
        new_challenger(cfg, scored(0.81))  # promoted: v2 is the champion, v1 the previous one
    before = snapshot(cfg)
    real = client_for(cfg)
    fail_at, steps = 1, []
    while True:
        failing = FailingClient(real, fail_at)
        monkeypatch.setattr(registry, "client_for", lambda _cfg, c=failing: c)
        try:
            new_challenger(cfg, scored(0.90))
        except ConnectionError as e:
            steps.append(str(e))
            monkeypatch.undo()
            assert snapshot(cfg) == before, f"after {e}"
            fail_at += 1
            continue
        break
    # Every write of a promoting registration was failed once, the final alias move included.
    assert steps[-1] == "injected failure in set_registered_model_alias"
    assert len(steps) == len(failing.writes) >= (7 if history == "empty" else 8)
    assert snapshot(cfg) != before
    # (MLflow does not reuse the numbers of the versions the failed attempts created and removed.)
    newest = max(snapshot(cfg)["versions"], key=int)
    assert aliases(cfg)["champion"] == aliases(cfg)["challenger"] == newest
    assert len(snapshot(cfg)["versions"]) == len(before.get("versions", {})) + 1


def test_cli_lists_promotes_rolls_back_and_prints_lineage(cfg: PipelineConfig) -> None:
    from tests.test_pipeline import run_cli

    new_challenger(cfg, scored(0.80))
    new_challenger(cfg, scored(0.79))
    sets = ["--set", f"workspace={cfg.workspace}", "--set", "tracking.registered_model=fashion"]

    refused = run_cli("promote", "2", *sets, timeout=120)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "version 2 not promoted: test accuracy 79.00% vs the champion's 80.00%" in refused.stdout
    forced = run_cli("promote", "2", "--force", "--reason", "new scanner", *sets, timeout=120)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    by_hand = "version 2 promoted to champion by hand: new scanner (the gate said: test accuracy"
    assert by_hand in forced.stdout

    listed = json.loads(run_cli("models", "--json", *sets, timeout=120).stdout)
    assert [(r["version"], r["aliases"], r["promotion"]) for r in listed] == [
        ("2", ["challenger", "champion"], "forced"),
        ("1", ["previous-champion"], "promoted"),
    ]
    assert listed[0]["test_accuracy"] == pytest.approx(0.79) and listed[0]["test_sha256"] == TEST_SET

    back = run_cli("rollback", "--reason", "regressed on site B", *sets, timeout=120)
    assert back.returncode == 0 and "from version 2 to version 1" in back.stdout, back.stdout + back.stderr
    chain = run_cli("lineage", "models:/fashion@champion", *sets, timeout=120)
    assert chain.returncode == 0, chain.stdout + chain.stderr
    assert "fashion version 1 (champion)" in chain.stdout and f"sha256 {TEST_SET}" in chain.stdout
    missing = run_cli("lineage", "models:/fashion@nobody", *sets, timeout=120)
    assert missing.returncode == 1 and "has no version with alias 'nobody'" in missing.stdout


@pytest.mark.slow
@pytest.mark.parametrize("mlflow_server", ["sqlite", "postgresql"], indirect=True)
def test_the_gate_against_a_real_mlflow_server_with_artifacts_in_s3(
    mlflow_server: Any, s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same moves through `mlflow server` (REST), the reports proxied into S3 by the server."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    name = f"fashion-{mlflow_server.backend}"
    cfg = PipelineConfig.model_validate(
        {
            "workspace": str(tmp_path / "ws"),
            "tracking": {"tracking_uri": mlflow_server.uri, "registered_model": name},
        }
    )
    assert new_challenger(cfg, scored(0.80)).champion == "1"
    assert new_challenger(cfg, scored(0.79)).decision.outcome == "rejected"
    assert new_challenger(cfg, scored(0.83)).decision.outcome == "promoted"
    assert aliases(cfg) == {"champion": "3", "challenger": "3", "previous-champion": "1"}

    before = snapshot(cfg)
    # Writes: the version, the challenger alias, 11 tags, the description, then the report upload.
    failing = FailingClient(client_for(cfg), fail_at=15)
    monkeypatch.setattr(registry, "client_for", lambda _cfg: failing)
    with pytest.raises(ConnectionError, match="injected failure in log_artifact"):
        new_challenger(cfg, scored(0.90))
    monkeypatch.undo()
    assert snapshot(cfg) == before

    assert registry.rollback(cfg, "canary failed").champion == "1"
    assert aliases(cfg) == {"champion": "1", "challenger": "3"}
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=mlflow_server.bucket)["Contents"]]
    assert sum(k.endswith("/promotion/version-3.json") for k in keys) == 1
