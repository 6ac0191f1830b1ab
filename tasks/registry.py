"""MLflow Model Registry: register a challenger, gate it against the champion, move the aliases.

Every change goes through a ``RegistryChange``, which records how to undo it: if any step fails
before the last one (the ``champion`` alias move), the registry is left as it was.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.config import PipelineConfig
from tasks.data import PreparedData
from tasks.promotion import Decision, HeldOutPredictions, ModelEvaluation, decide
from tasks.tracking import client_for

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
WEIGHTS_TAG = "model.weights_sha256"

log = logging.getLogger(__name__)


class PromotionError(RuntimeError):
    """A registry operation that cannot be done as asked; the message says why."""


@dataclass(frozen=True)
class UndoStep:
    """How to undo one registry write: data, not a closure, so a Prefect rollback hook in another
    task (or a later process) can replay it."""

    what: str
    op: Literal["delete_model", "delete_version", "point_alias", "set_tag", "delete_tag", "describe"]
    args: tuple[str | None, ...]


@dataclass(frozen=True)
class UndoLog:
    """The undo steps of one ``RegistryChange``, oldest first, with the registry they apply to."""

    tracking_uri: str
    model: str
    steps: tuple[UndoStep, ...] = ()


class RegistryChange:
    """Changes to one registered model that are undone, newest first, if the block raises.

    ``log`` holds what was done as undo steps; ``undo(log)`` replays them later (a transaction
    that fails after this block succeeded).
    """

    def __init__(self, client: MlflowClient, name: str):
        self.client = client
        self.name = name
        self._steps: list[UndoStep] = []

    def __enter__(self) -> RegistryChange:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            _replay(self.client, self.name, self._steps)

    @property
    def log(self) -> UndoLog:
        return UndoLog(self.client.tracking_uri, self.name, tuple(self._steps))

    def _record(self, what: str, op: str, *args: str | None) -> None:
        self._steps.append(UndoStep(what, op, args))  # type: ignore[arg-type]

    def ensure_model(self, description: str) -> None:
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description=description)
            self._record("creating the model", "delete_model")

    def create_version(self, source: str, run_id: str, tags: dict[str, str]) -> str:
        # A logged model (models:/m-...) is named by id too: a tracking server refuses it otherwise.
        model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
        created = self.client.create_model_version(
            self.name, source, run_id=run_id, tags=tags, model_id=model_id
        )
        version = str(created.version)
        self._record(f"version {version}", "delete_version", version)
        return version

    def set_alias(self, alias: str, version: str | None) -> None:
        """Point ``alias`` at ``version``; None deletes the alias."""
        old = alias_version(self.client, self.name, alias)
        if old == version:
            return
        _point(self.client, self.name, alias, version)
        self._record(f"alias {alias}", "point_alias", alias, old)

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        old = self.client.get_model_version(self.name, version).tags
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)
            if key in old:
                self._record(f"tag {key} of version {version}", "set_tag", version, key, old[key])
            else:
                self._record(f"tag {key} of version {version}", "delete_tag", version, key)

    def set_description(self, version: str, description: str) -> None:
        old = self.client.get_model_version(self.name, version).description or ""
        self.client.update_model_version(self.name, version, description=description)
        self._record(f"description of version {version}", "describe", version, old)


def _point(client: MlflowClient, name: str, alias: str, version: str | None) -> None:
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, version)


def _replay(client: MlflowClient, name: str, steps: list[UndoStep] | tuple[UndoStep, ...]) -> None:
    """Undo ``steps`` newest first; a step that fails is logged and the rest still run."""
    for step in reversed(steps):
        a = step.args
        try:
            if step.op == "delete_model":
                client.delete_registered_model(name)
            elif step.op == "delete_version":
                client.delete_model_version(name, a[0])  # type: ignore[arg-type]
            elif step.op == "point_alias":
                _point(client, name, a[0], a[1])  # type: ignore[arg-type]
            elif step.op == "set_tag":
                client.set_model_version_tag(name, a[0], a[1], a[2])  # type: ignore[arg-type]
            elif step.op == "delete_tag":
                client.delete_model_version_tag(name, a[0], a[1])  # type: ignore[arg-type]
            else:
                client.update_model_version(name, a[0], description=a[1])  # type: ignore[arg-type]
        except Exception as e:  # keep undoing the rest; the original error is re-raised
            log.error("registry: could not undo %s of %s: %s", step.what, name, e)


def undo(log_: UndoLog) -> None:
    """Undo what a finished ``RegistryChange`` did (a Prefect transaction's rollback hook)."""
    _replay(MlflowClient(log_.tracking_uri, registry_uri=log_.tracking_uri), log_.model, log_.steps)


def change(cfg: PipelineConfig) -> RegistryChange:
    """A ``RegistryChange`` of the configured registered model."""
    return RegistryChange(client_for(cfg), cfg.tracking.registered_model)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of the model, newest first."""
    found = client.search_model_versions(f"name='{name}'", max_results=10_000)
    return sorted(found, key=lambda v: int(v.version), reverse=True)


@dataclass(frozen=True)
class PromotionOutcome:
    """One challenger through the gate: its version, the decision, and the champion afterwards."""

    version: str
    registered: bool  # False: an existing version already held these weights
    decision: Decision
    champion: str | None

    def summary(self) -> str:
        if not self.registered:
            return self.decision.reason
        verdict = {
            "promoted": "promoted to champion",
            "forced": "promoted to champion by hand",
            "rejected": "not promoted",
        }[self.decision.outcome]
        return f"version {self.version} {verdict}: {self.decision.reason}"


def _decision_tags(decision: Decision) -> dict[str, str]:
    tags = {
        "promotion.outcome": decision.outcome,
        "promotion.reason": decision.reason[:4000],
        "promotion.compared_with": decision.champion_version or "none",
        "promotion.time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if decision.delta is not None:
        tags["promotion.delta"] = f"{decision.delta:.6f}"
    if decision.paired is not None:  # the test statistic: the discordant images, and its p-value
        tags["promotion.images_gained"] = str(decision.paired.gained)
        tags["promotion.images_lost"] = str(decision.paired.lost)
        tags["promotion.p_value"] = f"{decision.p_value:.6g}"
    if decision.champion is not None:
        tags["promotion.champion_accuracy"] = f"{decision.champion.accuracy:.6f}"
    if decision.challenger is not None:
        tags["promotion.challenger_accuracy"] = f"{decision.challenger.accuracy:.6f}"
    if decision.promote and decision.champion_version:
        tags["promotion.previous_champion"] = decision.champion_version
    return tags


def _description(decision: Decision) -> str:
    accuracy = f"Test accuracy {100 * decision.challenger.accuracy:.2f}%. " if decision.challenger else ""
    return f"{accuracy}Promotion gate: {decision.outcome}; {decision.reason}."


def _log_report(client: MlflowClient, name: str, mv: ModelVersion, decision: Decision) -> None:
    """The promotion report, a JSON artifact of the run that produced the version."""
    if not mv.run_id:
        return
    report: dict[str, Any] = {"model": name, "version": mv.version, "source": mv.source, **decision.to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"version-{mv.version}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        client.log_artifact(mv.run_id, str(path), "promotion")


def _test_predictions(client: MlflowClient, mv: ModelVersion) -> HeldOutPredictions | None:
    """The test predictions the run of ``mv`` logged beside its model; None when it logged none.
    (A failure to reach the server is raised, not taken for a missing file: the task retries it.)"""
    folder = HeldOutPredictions.ARTIFACT_DIR
    artifact = f"{folder}/{HeldOutPredictions.FILE}"
    if mv.run_id is None or artifact not in {a.path for a in client.list_artifacts(mv.run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return HeldOutPredictions.load(client.download_artifacts(mv.run_id, artifact, tmp))


def _gate(change: RegistryChange, cfg: PipelineConfig, version: str, forced: str | None) -> PromotionOutcome:
    """Compare ``version`` with the champion, record the decision, and move ``champion`` last."""
    client, name = change.client, change.name
    mv = _version(client, name, version)
    champion = alias_version(client, name, CHAMPION)
    if champion == version:
        raise PromotionError(f"version {version} of {name!r} is already the champion")
    champion_eval, paired = None, None
    if champion is not None:
        champion_mv = client.get_model_version(name, champion)
        champion_eval = ModelEvaluation.from_tags(champion_mv.tags)
        new, old = _test_predictions(client, mv), _test_predictions(client, champion_mv)
        paired = (new, old) if new is not None and old is not None else None
    decision = decide(ModelEvaluation.from_tags(mv.tags), champion_eval, champion, cfg.promotion, paired)
    if forced is not None:
        decision = decision.force(forced)
    change.set_tags(version, _decision_tags(decision))
    change.set_description(version, _description(decision))
    _log_report(client, name, mv, decision)
    if not decision.promote:
        return PromotionOutcome(version, True, decision, champion)
    if champion:
        change.set_alias(PREVIOUS_CHAMPION, champion)
    change.set_alias(CHAMPION, version)  # the one move that promotes: last
    return PromotionOutcome(version, True, decision, version)


@dataclass(frozen=True)
class Registration:
    version: str
    registered: bool  # False: an existing version already held these weights
    reason: str = ""


def register_version(
    change: RegistryChange,
    model_uri: str,
    run_id: str,
    tags: dict[str, str],
    evaluation: ModelEvaluation,
    weights_sha256: str,
) -> Registration:
    """Register the model as a new version with alias ``challenger``, unless some version already
    holds these weights (a rerun on the same data, code and config)."""
    for mv in versions(change.client, change.name):
        if mv.tags.get(WEIGHTS_TAG) == weights_sha256:
            reason = (
                f"not registered: version {mv.version} already holds these weights "
                f"(sha256 {weights_sha256[:12]})"
            )
            return Registration(str(mv.version), False, reason)
    change.ensure_model("Encoder + linear head from ssl-pipeline; see each version's lineage tags")
    version = change.create_version(
        model_uri, run_id, {**tags, **evaluation.tags(), WEIGHTS_TAG: weights_sha256}
    )
    change.set_alias(CHALLENGER, version)
    return Registration(version, True)


def gate(change: RegistryChange, cfg: PipelineConfig, registration: Registration) -> PromotionOutcome:
    """Put a freshly registered version through the gate; a known one is only reported."""
    if not registration.registered:
        champion = alias_version(change.client, change.name, CHAMPION)
        evaluation = ModelEvaluation.from_tags(
            _version(change.client, change.name, registration.version).tags
        )
        decision = Decision(False, registration.reason, evaluation, None, champion)
        return PromotionOutcome(registration.version, False, decision, champion)
    return _gate(change, cfg, registration.version, None)


def register_challenger(
    cfg: PipelineConfig,
    model_uri: str,
    run_id: str,
    tags: dict[str, str],
    evaluation: ModelEvaluation,
    weights_sha256: str,
) -> PromotionOutcome:
    """``register_version`` then ``gate``, all undone if any step fails."""
    with change(cfg) as registry_change:
        registration = register_version(registry_change, model_uri, run_id, tags, evaluation, weights_sha256)
        return gate(registry_change, cfg, registration)


def unchanged_since_champion(cfg: PipelineConfig, data: PreparedData) -> str | None:
    """Why retraining would learn nothing new: the champion was trained on these very datasets
    (same unlabeled and labeled content hashes); None when there is new data or no champion."""
    client = client_for(cfg)
    name = cfg.tracking.registered_model
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        return None
    tags = client.get_model_version(name, champion).tags
    digests = data.digests()
    if any(tags.get(f"data.{kind}.sha256") != digests[kind] for kind in ("unlabeled", "labeled")):
        return None
    return (
        f"no new data since the champion (version {champion}) was trained: unlabeled "
        f"sha256 {digests['unlabeled'][:12]}, labeled sha256 {digests['labeled'][:12]}"
    )


def _exists(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True


def promote(
    cfg: PipelineConfig, version: str, force: bool = False, reason: str | None = None
) -> PromotionOutcome:
    """Put a registered version through the gate; ``force`` (with a reason) promotes it anyway."""
    if force and not (reason and reason.strip()):
        raise PromotionError("--force needs --reason: say why the gate is overruled")
    with change(cfg) as registry_change:
        return _gate(registry_change, cfg, version, reason if force else None)


def _version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise PromotionError(f"registered model {name!r} has no version {version}") from None


@dataclass(frozen=True)
class Rollback:
    demoted: str
    champion: str
    previous_champion: str | None


def rollback(cfg: PipelineConfig, reason: str) -> Rollback:
    """Move ``champion`` back to ``previous-champion``; that version's own predecessor becomes the
    new ``previous-champion``, so rolling back again goes one step further back."""
    client = client_for(cfg)
    name = cfg.tracking.registered_model
    champion = alias_version(client, name, CHAMPION)
    previous = alias_version(client, name, PREVIOUS_CHAMPION)
    if champion is None:
        raise PromotionError(f"registered model {name!r} has no champion to roll back")
    if previous is None:
        raise PromotionError(
            f"no version of {name!r} holds alias {PREVIOUS_CHAMPION!r}: nothing to roll back to"
        )
    older = client.get_model_version(name, previous).tags.get("promotion.previous_champion")
    if older is not None and older in (champion, previous):
        older = None
    with RegistryChange(client, name) as registry_change:
        registry_change.set_tags(
            champion,
            {
                "rollback.reason": reason[:4000],
                "rollback.to_version": previous,
                "rollback.time": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        registry_change.set_alias(PREVIOUS_CHAMPION, older)
        registry_change.set_alias(CHAMPION, previous)
    return Rollback(champion, previous, older)


def version_summaries(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Each version's aliases, test accuracy, test set, promotion outcome and runs, newest first."""
    client = client_for(cfg)
    name = cfg.tracking.registered_model
    if not _exists(client, name):
        return []
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in versions(client, name):
        evaluation = ModelEvaluation.from_tags(mv.tags)
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(
                    timespec="seconds"
                ),
                "test_accuracy": evaluation.accuracy if evaluation else None,
                "test_sha256": mv.tags.get("data.test.sha256"),
                "unlabeled_sha256": mv.tags.get("data.unlabeled.sha256"),
                "labeled_sha256": mv.tags.get("data.labeled.sha256"),
                "promotion": mv.tags.get("promotion.outcome"),
                "sweep_run": mv.tags.get("sweep.run_id"),
                "best_cell": mv.tags.get("sweep.best_cell"),
            }
        )
    return rows


def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """``models:/NAME@ALIAS`` -> (NAME, "alias", ALIAS); ``models:/NAME/3`` -> (NAME, "version", "3")."""
    path = uri.removeprefix("models:/")
    if path == uri or not path:
        raise PromotionError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if "@" in path:
        name, _, alias = path.rpartition("@")
        if name and alias:
            return name, "alias", alias
    name, _, version = path.rpartition("/")
    if name and version.isdigit():
        return name, "version", version
    raise PromotionError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def _find_run(client: MlflowClient, run_id: str | None) -> Run | None:
    try:
        return client.get_run(run_id) if run_id else None
    except MlflowException:
        return None


def _run_summary(
    run_id: str | None, run: Run | None, metrics: tuple[str, ...], **extra: Any
) -> dict[str, Any] | None:
    if not run_id:
        return None
    if run is None:
        return {"run_id": run_id, "missing": True}
    return {
        "run_id": run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "step": run.data.tags.get("pipeline.step"),
        "metrics": {k: run.data.metrics[k] for k in metrics if k in run.data.metrics},
        **extra,
    }


def lineage(cfg: PipelineConfig, uri: str) -> dict[str, Any]:
    """Data versions -> code and config -> pretraining run -> sweep run -> this model version."""
    name, kind, ref = parse_model_uri(uri)
    client = client_for(cfg)
    if kind == "alias":
        try:
            mv = client.get_model_version_by_alias(name, ref)
        except MlflowException:
            raise PromotionError(f"{uri}: {name!r} has no version with alias {ref!r}") from None
    else:
        try:
            mv = client.get_model_version(name, ref)
        except MlflowException:
            raise PromotionError(f"{uri}: registered model {name!r} has no version {ref}") from None
    tags = mv.tags
    pretrain_id, sweep_id = tags.get("pretrain.run_id"), tags.get("sweep.run_id") or mv.run_id
    pretrain_run, sweep_run = _find_run(client, pretrain_id), _find_run(client, sweep_id)
    params = next((run.data.params for run in (pretrain_run, sweep_run) if run), {})
    pretraining = _run_summary(
        pretrain_id, pretrain_run, ("pretrain_loss", "pretrain_steps"), epochs=params.get("pretrain.epochs")
    )
    sweep = _run_summary(sweep_id, sweep_run, (), best_cell=tags.get("sweep.best_cell"))
    data = {
        split: {
            "dvc_md5": tags.get(f"data.{split}.dvc_md5"),
            "sha256": tags.get(f"data.{split}.sha256"),
            "num_images": params.get(f"data.{split}.num_images"),
        }
        for split in ("unlabeled", "labeled", "test")
    }
    evaluation = ModelEvaluation.from_tags(tags)
    held = client.get_registered_model(name).aliases.items()
    aliases = sorted(alias for alias, v in held if str(v) == str(mv.version))
    return {
        "model": {"name": name, "version": str(mv.version), "aliases": aliases, "source": mv.source},
        "data": data,
        "code": {"git_commit": tags.get("git.commit"), "config_sha256": tags.get("config.sha256")},
        "ssl": {
            "method": tags.get("ssl.method"),
            "backbone": tags.get("ssl.backbone"),
            "profile": tags.get("pipeline.profile"),
        },
        "pretraining_run": pretraining,
        "sweep_run": sweep,
        "evaluation": None if evaluation is None else {"test_accuracy": evaluation.accuracy},
        "promotion": {k.removeprefix("promotion."): v for k, v in tags.items() if k.startswith("promotion.")},
    }
