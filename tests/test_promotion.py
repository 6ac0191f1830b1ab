"""The promotion gate and the registry moves, against a real MLflow registry (SQLite in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tasks import registry
from tasks.config import PipelineConfig, PromotionConfig
from tasks.promotion import ModelEvaluation, decide, weights_sha256
from tasks.registry import PromotionError
from tasks.tracking import client_for

CLASSES = ("shirt", "shoe", "bag")
TEST_SET = "a" * 64
POLICY = PromotionConfig(margin=0.002, class_tolerance=0.02)


def evaluation(
    accuracy: float, per_class: tuple[float, ...] | None = None, test: str = TEST_SET
) -> ModelEvaluation:
    per_class = per_class or (accuracy,) * len(CLASSES)
    return ModelEvaluation(test, "dvcmd5.dir", 3000, accuracy, dict(zip(CLASSES, per_class, strict=True)))


# The gate, as a function.


def test_no_champion_promotes_and_missing_metrics_never_do() -> None:
    assert decide(evaluation(0.5), None, None, POLICY).promote
    assert not decide(None, evaluation(0.5), "1", POLICY).promote
    missing = decide(evaluation(0.9), None, "1", POLICY)
    assert not missing.promote and "no test metrics" in missing.reason


@pytest.mark.parametrize(
    ("challenger", "promote", "words"),
    [
        (0.800, False, "a tie"),
        (0.790, False, "below the margin"),
        (0.801, False, "below the margin"),  # +0.1 points < margin of 0.2
        (0.803, True, "+0.30 points"),
    ],
)
def test_accuracy_must_rise_by_the_margin(challenger: float, promote: bool, words: str) -> None:
    decision = decide(evaluation(challenger), evaluation(0.800), "1", POLICY)
    assert decision.promote is promote
    assert words in decision.reason


def test_a_tie_never_promotes_even_with_no_margin() -> None:
    assert not decide(evaluation(0.8), evaluation(0.8), "1", PromotionConfig(margin=0.0)).promote


def test_a_class_that_regresses_beyond_the_tolerance_blocks_promotion() -> None:
    champion = evaluation(0.80, (0.80, 0.80, 0.80))
    within = decide(evaluation(0.82, (0.79, 0.85, 0.82)), champion, "1", POLICY)
    assert within.promote
    beyond = decide(evaluation(0.82, (0.77, 0.87, 0.82)), champion, "1", POLICY)
    assert not beyond.promote
    assert beyond.regressions == {"shirt": pytest.approx(0.03)}
    assert "'shirt' loses 3.00 points" in beyond.reason


def test_different_test_sets_refuse_to_compare() -> None:
    decision = decide(evaluation(0.95, test="b" * 64), evaluation(0.80), "1", POLICY)
    assert not decision.promote
    assert "different test sets" in decision.reason and "bbbbbbbbbbbb" in decision.reason
    other_dvc = ModelEvaluation(TEST_SET, "other.dir", 3000, 0.95, dict.fromkeys(CLASSES, 0.95))
    assert not decide(other_dvc, evaluation(0.80), "1", POLICY).promote


def test_evaluation_round_trips_through_version_tags() -> None:
    original = evaluation(0.8123, (0.7, 0.9, 0.8369))
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


def new_challenger(
    cfg: PipelineConfig, ev: ModelEvaluation, weights: str | None = None
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
    (folder / "weights.txt").write_text(str(ev.accuracy))
    client.log_artifact(run.info.run_id, str(folder / "weights.txt"), "model")
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
    first = new_challenger(cfg, evaluation(0.80))
    assert (first.version, first.decision.outcome, first.champion) == ("1", "promoted", "1")
    assert aliases(cfg) == {"champion": "1", "challenger": "1"}

    worse = new_challenger(cfg, evaluation(0.78))
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
    assert report["challenger"]["accuracy"] == 0.78 and report["champion"]["accuracy"] == 0.80


def test_a_better_one_is_promoted_and_rollback_restores_the_previous_champion(cfg: PipelineConfig) -> None:
    new_challenger(cfg, evaluation(0.80))
    better = new_challenger(cfg, evaluation(0.83))
    assert (better.decision.outcome, better.champion) == ("promoted", "2")
    assert aliases(cfg) == {"champion": "2", "challenger": "2", "previous-champion": "1"}
    best = new_challenger(cfg, evaluation(0.86))
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
    new_challenger(cfg, evaluation(0.80, (0.80, 0.80, 0.80)))
    tie = new_challenger(cfg, evaluation(0.80, (0.80, 0.80, 0.80)))
    regression = new_challenger(cfg, evaluation(0.85, (0.70, 0.95, 0.90)))
    elsewhere = new_challenger(cfg, evaluation(0.95, test="b" * 64))
    assert [o.decision.outcome for o in (tie, regression, elsewhere)] == ["rejected"] * 3
    assert "a tie" in tie.decision.reason
    assert "'shirt' loses 10.00 points" in regression.decision.reason
    assert "different test sets" in elsewhere.decision.reason
    assert aliases(cfg) == {"champion": "1", "challenger": "4"}


def test_same_weights_are_not_registered_twice(cfg: PipelineConfig) -> None:
    new_challenger(cfg, evaluation(0.80), weights="f" * 64)
    again = new_challenger(cfg, evaluation(0.80), weights="f" * 64)
    assert not again.registered and again.version == "1"
    assert "already holds these weights" in again.summary()
    assert len(client_for(cfg).search_model_versions("name='fashion'")) == 1


def test_promote_by_hand_needs_the_gate_or_a_reason(cfg: PipelineConfig) -> None:
    new_challenger(cfg, evaluation(0.80))
    new_challenger(cfg, evaluation(0.79))
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
        new_challenger(cfg, evaluation(0.80))
        new_challenger(cfg, evaluation(0.81))  # rejected: v2 is the challenger
    before = snapshot(cfg)
    real = client_for(cfg)
    fail_at, steps = 1, []
    while True:
        failing = FailingClient(real, fail_at)
        monkeypatch.setattr(registry, "client_for", lambda _cfg, c=failing: c)
        try:
            new_challenger(cfg, evaluation(0.90))
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

    new_challenger(cfg, evaluation(0.80))
    new_challenger(cfg, evaluation(0.79))
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
    assert listed[0]["test_accuracy"] == 0.79 and listed[0]["test_sha256"] == TEST_SET

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
    assert new_challenger(cfg, evaluation(0.80)).champion == "1"
    assert new_challenger(cfg, evaluation(0.79)).decision.outcome == "rejected"
    assert new_challenger(cfg, evaluation(0.83)).decision.outcome == "promoted"
    assert aliases(cfg) == {"champion": "3", "challenger": "3", "previous-champion": "1"}

    before = snapshot(cfg)
    # Writes: the version, the challenger alias, 8 tags, the description, then the report upload.
    failing = FailingClient(client_for(cfg), fail_at=12)
    monkeypatch.setattr(registry, "client_for", lambda _cfg: failing)
    with pytest.raises(ConnectionError, match="injected failure in log_artifact"):
        new_challenger(cfg, evaluation(0.90))
    monkeypatch.undo()
    assert snapshot(cfg) == before

    assert registry.rollback(cfg, "canary failed").champion == "1"
    assert aliases(cfg) == {"champion": "1", "challenger": "3"}
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=mlflow_server.bucket)["Contents"]]
    assert sum(k.endswith("/promotion/version-3.json") for k in keys) == 1
