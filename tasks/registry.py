"""MLflow Model Registry: register a challenger, gate it against the champion, move the aliases.

Every change goes through a ``RegistryChange``, which records how to undo it: if any step fails
before the last one (the ``champion`` alias move), the registry is left as it was.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.config import PipelineConfig
from tasks.promotion import Decision, ModelEvaluation, decide
from tasks.tracking import client_for

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
WEIGHTS_TAG = "model.weights_sha256"

log = logging.getLogger(__name__)


class PromotionError(RuntimeError):
    """A registry operation that cannot be done as asked; the message says why."""


class RegistryChange:
    """Changes to one registered model that are undone, newest first, if the block raises."""

    def __init__(self, client: MlflowClient, name: str):
        self.client = client
        self.name = name
        self._undo: list[tuple[str, Callable[[], object]]] = []

    def __enter__(self) -> RegistryChange:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            return
        for what, undo in reversed(self._undo):
            try:
                undo()
            except Exception as e:  # keep undoing the rest; the original error is re-raised
                log.error("registry: could not undo %s of %s: %s", what, self.name, e)

    def ensure_model(self, description: str) -> None:
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description=description)
            self._undo.append(("creating the model", lambda: self.client.delete_registered_model(self.name)))

    def create_version(self, source: str, run_id: str, tags: dict[str, str]) -> str:
        # A logged model (models:/m-...) is named by id too: a tracking server refuses it otherwise.
        model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
        created = self.client.create_model_version(
            self.name, source, run_id=run_id, tags=tags, model_id=model_id
        )
        version = str(created.version)
        self._undo.append(
            (f"version {version}", lambda: self.client.delete_model_version(self.name, version))
        )
        return version

    def set_alias(self, alias: str, version: str | None) -> None:
        """Point ``alias`` at ``version``; None deletes the alias."""
        old = alias_version(self.client, self.name, alias)
        if old == version:
            return
        self._point(alias, version)
        self._undo.append((f"alias {alias}", lambda: self._point(alias, old)))

    def _point(self, alias: str, version: str | None) -> None:
        if version is None:
            self.client.delete_registered_model_alias(self.name, alias)
        else:
            self.client.set_registered_model_alias(self.name, alias, version)

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        old = self.client.get_model_version(self.name, version).tags
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)
            undo = self._tag_setter(version, key, old[key]) if key in old else self._tag_deleter(version, key)
            self._undo.append((f"tag {key} of version {version}", undo))

    def _tag_setter(self, version: str, key: str, value: str) -> Callable[[], None]:
        return lambda: self.client.set_model_version_tag(self.name, version, key, value)

    def _tag_deleter(self, version: str, key: str) -> Callable[[], None]:
        return lambda: self.client.delete_model_version_tag(self.name, version, key)

    def set_description(self, version: str, description: str) -> None:
        old = self.client.get_model_version(self.name, version).description or ""
        self.client.update_model_version(self.name, version, description=description)
        self._undo.append(
            (
                f"description of version {version}",
                lambda: self.client.update_model_version(self.name, version, description=old),
            )
        )


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


def _gate(change: RegistryChange, cfg: PipelineConfig, version: str, forced: str | None) -> PromotionOutcome:
    """Compare ``version`` with the champion, record the decision, and move ``champion`` last."""
    client, name = change.client, change.name
    mv = _version(client, name, version)
    champion = alias_version(client, name, CHAMPION)
    if champion == version:
        raise PromotionError(f"version {version} of {name!r} is already the champion")
    champion_eval = None
    if champion is not None:
        champion_eval = ModelEvaluation.from_tags(client.get_model_version(name, champion).tags)
    decision = decide(ModelEvaluation.from_tags(mv.tags), champion_eval, champion, cfg.promotion)
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


def register_challenger(
    cfg: PipelineConfig,
    model_uri: str,
    run_id: str,
    tags: dict[str, str],
    evaluation: ModelEvaluation,
    weights_sha256: str,
) -> PromotionOutcome:
    """Register the model as a new version with alias ``challenger`` and put it through the gate.

    Weights some version already holds (a rerun on the same data, code and config) are not
    registered again.
    """
    client = client_for(cfg)
    name = cfg.tracking.registered_model
    for mv in versions(client, name):
        if mv.tags.get(WEIGHTS_TAG) == weights_sha256:
            champion = alias_version(client, name, CHAMPION)
            reason = (
                f"not registered: version {mv.version} already holds these weights "
                f"(sha256 {weights_sha256[:12]})"
            )
            decision = Decision(False, reason, evaluation, None, champion)
            return PromotionOutcome(str(mv.version), False, decision, champion)
    with RegistryChange(client, name) as change:
        change.ensure_model("Encoder + linear head from ssl-pipeline; see each version's lineage tags")
        version = change.create_version(
            model_uri, run_id, {**tags, **evaluation.tags(), WEIGHTS_TAG: weights_sha256}
        )
        change.set_alias(CHALLENGER, version)
        return _gate(change, cfg, version, None)


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
    client = client_for(cfg)
    name = cfg.tracking.registered_model
    with RegistryChange(client, name) as change:
        return _gate(change, cfg, version, reason if force else None)


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
    with RegistryChange(client, name) as change:
        change.set_tags(
            champion,
            {
                "rollback.reason": reason[:4000],
                "rollback.to_version": previous,
                "rollback.time": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        change.set_alias(PREVIOUS_CHAMPION, older)
        change.set_alias(CHAMPION, previous)
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
