"""The one typed configuration, read from ``params.yaml``, shared by CLI, flows and DVC stages.

``params.yaml`` holds the default profile at its top level and, under ``profiles:``, the
keys each other profile changes. ``--set key=value`` overrides apply last. Unknown keys
and bad values fail before any work starts, with an error naming the key. Without a
``params.yaml`` in the working directory the built-in one applies (the checkout's, shipped in
the package as ``BUILT_IN_PARAMS``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from cronsim import CronSim, CronSimError  # Prefect's cron parser
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from ssl_models.augment import AugmentParams
from ssl_models.backbones import BACKBONES, is_timm_model
from ssl_models.distill import DistillSettings
from ssl_models.evaluate import LinearProbeSettings
from ssl_models.methods import METHODS, method_params
from ssl_models.train import Precision, TrainSettings

BUILT_IN_PARAMS = Path(__file__).with_name("default_params.yaml")  # a link to the checkout's params.yaml
Fraction = Annotated[float, Field(gt=0, le=1)]
Probability = Annotated[float, Field(ge=0, le=1)]


class ConfigError(ValueError):
    """A configuration file, profile or override is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DvcConfig(_Section):
    """Where the datasets are versioned: <root>/<folder>/{unlabeled,labeled,test}, tracked by DVC."""

    enabled: bool = True
    root: str = "."  # the git (or plain) folder that holds .dvc/ and the dataset folders
    folder: str = "data"
    remote: str | None = None  # None: <workspace>/dvc-remote; or a folder, or s3://bucket/prefix
    endpoint_url: str | None = None  # an S3-compatible store, e.g. http://127.0.0.1:8333
    push: bool = True


class IngestConfig(_Section):
    """How images enter a dataset folder: threads that decode and check them, shard size, memory."""

    workers: Annotated[int, Field(ge=0)] = 0  # 0: one per core
    shard_mb: Annotated[float, Field(gt=0)] = 128  # target size of a shard of image bytes
    memory_mb: Annotated[float, Field(ge=16)] = 512  # images in flight plus the open shards' row groups


class StreamingConfig(_Section):
    """How training and evaluation read the shards through Ray Data."""

    shards_from: Literal["folder", "remote"] = "folder"  # remote: the DVC remote's copies (e.g. s3://)
    materialize: Literal["auto", "always", "never"] = (
        "auto"  # auto: when decoded it fits in half the object store
    )
    # object-store memory one streamed read may hold in flight (Ray Data's resource_limits);
    # None: Ray Data's default, half the object store
    object_store_mb: Annotated[float, Field(gt=0)] | None = 1024
    shuffle_buffer_mb: Annotated[float, Field(gt=0)] = 256  # each worker's local shuffle buffer
    prefetch_batches: Annotated[int, Field(ge=0)] = 2


class DataConfig(_Section):
    source: Literal["fashion_mnist", "folder"] = "fashion_mnist"
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    # source "folder": each a folder, an s3://bucket/prefix, or a .csv/.parquet table of path[,label]
    unlabeled_dir: str | None = None
    labeled_dir: str | None = None
    test_dir: str | None = None
    source_endpoint_url: str | None = None  # an S3-compatible store for s3:// sources
    unlabeled_limit: Annotated[int, Field(gt=0)] | None = None
    labeled_limit: Annotated[int, Field(gt=0)] | None = None
    test_limit: Annotated[int, Field(gt=0)] | None = None
    channels: Literal[1, 3] = 1
    image_size: Annotated[int, Field(ge=8, le=1024)] = 28
    skip_corrupt: bool = False
    allow_test_overlap: bool = False  # true: test images that are also training images do not fail the run
    ingest: IngestConfig = IngestConfig()
    streaming: StreamingConfig = StreamingConfig()
    dvc: DvcConfig = DvcConfig()

    @model_validator(mode="after")
    def _folders_given(self) -> DataConfig:
        if self.source == "folder":
            missing = [k for k in ("unlabeled_dir", "labeled_dir", "test_dir") if not getattr(self, k)]
            if missing:
                raise ValueError(f"source 'folder' needs data.{', data.'.join(missing)}")
        if self.streaming.shards_from == "remote" and not (self.dvc.enabled and self.dvc.push):
            raise ValueError("streaming.shards_from: 'remote' needs data.dvc.enabled and data.dvc.push")
        return self


class AugmentConfig(_Section):
    crop_scale: tuple[Fraction, Fraction] = (0.2, 1.0)
    crop_ratio: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.75, 4 / 3)
    flip_p: Probability = 0.5
    jitter_p: Probability = 0.8
    brightness: Annotated[float, Field(ge=0, lt=1)] = 0.4
    contrast: Annotated[float, Field(ge=0, lt=1)] = 0.4
    saturation: Annotated[float, Field(ge=0)] = 0.2  # RGB only, as hue and grayscale_p
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    grayscale_p: Probability = 0.2
    blur_p: Probability = 0.0
    blur_sigma: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.1, 2.0)
    solarize_p: Probability = 0.0

    @field_validator("crop_scale", "crop_ratio", "blur_sigma")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"expected (low, high) with low <= high, got {list(v)}")
        return v

    def params(self) -> AugmentParams:
        return AugmentParams(**self.model_dump())


class ModelConfig(_Section):
    backbone: str = "small_cnn"  # one of BACKBONES, or any timm model by name
    # A local file of the backbone's weights to start from (timm: its checkpoint, e.g. ImageNet
    # weights a user has; the others: a state dict); read by every pretraining worker.
    weights: str | None = None

    @field_validator("backbone")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in BACKBONES and not is_timm_model(v):
            raise ValueError(
                f"unknown backbone {v!r}; choose one of {sorted(BACKBONES)} or a timm model name"
            )
        return v


class OptimConfig(_Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0, le=10)] = 2e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    batch_size: Annotated[int, Field(gt=0)] = 256
    channels_last: bool = True

    def settings(self, seed: int) -> TrainSettings:
        """The loop's settings: every key this section shares with ``TrainSettings``."""
        shared = {f.name for f in dataclasses.fields(TrainSettings)}
        return TrainSettings(seed=seed, **self.model_dump(include=shared))


class PretrainConfig(OptimConfig):
    method: str = "simclr"
    method_params: dict[str, Any] = Field(default_factory=dict)
    epochs: Annotated[int, Field(gt=0)] = 10
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0
    checkpoint_every_steps: Annotated[int, Field(ge=0)] = 0
    precision: Precision = "fp32"
    compile: bool = False

    @field_validator("method")
    @classmethod
    def _method_known(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of {sorted(METHODS)}")
        return v

    @model_validator(mode="after")
    def _method_params_valid(self) -> PretrainConfig:
        params_type = METHODS[self.method].Params
        try:
            method_params(self.method, self.method_params)
        except ValueError as e:
            raise ValueError(f"method_params: {e}") from None
        try:
            TypeAdapter(params_type).validate_python(self.method_params)
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"method_params.{err['loc'][-1]}: {err['msg']} (got {err['input']!r})") from None
        return self


class KnnConfig(_Section):
    k: Annotated[int, Field(gt=0)] = 200
    temperature: Annotated[float, Field(gt=0)] = 0.1


class LinearProbeConfig(_Section):
    steps: Annotated[int, Field(gt=0)] = 500
    lr: Annotated[float, Field(gt=0)] = 1e-2
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    batch_size: Annotated[int, Field(gt=0)] = 1024

    def settings(self, seed: int) -> LinearProbeSettings:
        return LinearProbeSettings(seed=seed, **self.model_dump())


class FinetuneConfig(OptimConfig):
    lr: Annotated[float, Field(gt=0, le=10)] = 1e-3
    steps: Annotated[int, Field(gt=0)] = 300
    augment: AugmentConfig = AugmentConfig(crop_scale=(0.5, 1.0), jitter_p=0.0, grayscale_p=0.0)


class DistillConfig(FinetuneConfig):
    """SimCLRv2's third step as a protocol of the sweep: at each fine-tuned label budget and seed,
    the fine-tuned model (the cell's selected config) teaches a student on the unlabeled images,
    plus ``labeled_weight`` x the cross entropy on the cell's labels. Its config is not searched."""

    enabled: bool = True
    lr: Annotated[float, Field(gt=0, le=10)] = 3e-3
    # None: the pretrained encoder (self-distillation); or another backbone, initialised from the seed
    backbone: str | None = None
    temperature: Annotated[float, Field(gt=0)] = 1.0
    labeled_weight: Annotated[float, Field(ge=0)] = 1.0

    @field_validator("backbone")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        return v if v is None else ModelConfig._known(v)

    def distill_settings(self, seed: int) -> DistillSettings:
        return DistillSettings(self.temperature, self.labeled_weight, self.settings(seed))


SEARCHABLE: dict[str, type[_Section]] = {
    "knn": KnnConfig,
    "linear": LinearProbeConfig,
    "finetune": FinetuneConfig,
}


class SearchConfig(_Section):
    """Ray Tune's grid: per protocol, the values to try for keys of that protocol's section.

    ``finetune`` also drives the supervised-from-scratch baseline (same grid, same budget).
    """

    knn: dict[str, list[Any]] = Field(default_factory=dict)
    linear: dict[str, list[Any]] = Field(default_factory=dict)
    finetune: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _values_valid(self) -> SearchConfig:
        for protocol, section in SEARCHABLE.items():
            for key, values in getattr(self, protocol).items():
                if key not in section.model_fields or key == "augment":
                    searchable = sorted(k for k in section.model_fields if k != "augment")
                    raise ValueError(f"{protocol}.{key}: not a {protocol} setting; choose from {searchable}")
                if not values:
                    raise ValueError(f"{protocol}.{key}: give at least one value")
                for value in values:
                    try:
                        section.model_validate({key: value})
                    except ValidationError as e:
                        raise ValueError(
                            f"{protocol}.{key}: {e.errors()[0]['msg']} (got {value!r})"
                        ) from None
        return self


class AshaConfig(_Section):
    """Early stopping within each (protocol, label fraction) cell, on validation accuracy."""

    enabled: bool = True
    reports: Annotated[int, Field(gt=0)] = 4  # validation evaluations per trial: ASHA's time unit
    grace_period: Annotated[int, Field(gt=0)] = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 3

    @model_validator(mode="after")
    def _grace_within_budget(self) -> AshaConfig:
        if self.grace_period > self.reports:
            raise ValueError(f"grace_period: at most reports ({self.reports}), got {self.grace_period}")
        return self


class EvaluateConfig(_Section):
    labels_per_class: list[Annotated[int, Field(gt=0)]] = [10]  # budgets of every protocol
    label_fractions: list[Fraction] = Field(default=[0.01, 0.1, 1.0], min_length=1)
    finetune_fractions: list[Fraction] = [0.01, 0.1]
    primary_protocol: Literal["linear", "finetune", "distill"] = "finetune"
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default=[0, 1, 2], min_length=1)
    # What configs are picked and trials stopped on. budget: a stratified share (selection_share)
    # of each cell's own labels, which it then does not train on: a cell uses its budget and
    # nothing more. validation: one split of validation_size labels outside every budget, shared
    # by all cells (the labels column then counts it too).
    selection: Literal["budget", "validation"] = "budget"
    selection_share: Annotated[float, Field(gt=0, lt=1)] = 0.2
    validation_size: Annotated[int, Field(gt=0)] = 5000
    knn: KnnConfig = KnnConfig()
    linear: LinearProbeConfig = LinearProbeConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    distill: DistillConfig = DistillConfig()
    search: SearchConfig = SearchConfig()
    asha: AshaConfig = AshaConfig()
    max_concurrent_trials: Annotated[int, Field(gt=0)] | None = None  # None: as the resources allow
    cpus_per_trial: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_trial: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _primary_evaluated(self) -> EvaluateConfig:
        trained = self.finetune_fractions or self.labels_per_class
        if self.primary_protocol in ("finetune", "distill") and not trained:
            raise ValueError(
                f"primary_protocol '{self.primary_protocol}' needs at least one finetune_fractions or "
                "labels_per_class entry"
            )
        if self.primary_protocol == "distill" and not self.distill.enabled:
            raise ValueError("primary_protocol 'distill' needs distill.enabled")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: repeated seed in {self.seeds}")
        return self

    def grid(self, protocol: str) -> list[dict[str, Any]]:
        """Every point of the protocol's search grid as a full section dump, the base config first."""
        section = getattr(self, "finetune" if protocol == "supervised" else protocol)
        space = getattr(self.search, "finetune" if protocol == "supervised" else protocol)
        base = section.model_dump(mode="json")
        points = [dict(zip(space, values, strict=True)) for values in itertools.product(*space.values())]
        ordered = sorted(points, key=lambda p: p != {k: base[k] for k in p})
        return [{**base, **point} for point in ordered]


class TrackingConfig(_Section):
    tracking_uri: str | None = (
        None  # None: MLFLOW_TRACKING_URI if set, else SQLite + artifacts in the workspace
    )
    experiment: str = "ssl-pipeline"
    registered_model: str = "ssl-pipeline-encoder"


class PromotionConfig(_Section):
    """The gate a challenger passes to replace the champion, both measured on the same test set."""

    margin: Probability = 0.002  # test accuracy must rise by at least this much (and by more than 0)
    class_tolerance: Probability = 0.02  # no class's test accuracy may fall by more than this
    # how sure the gate must be (one-sided exact McNemar test on the same test images) that the
    # challenger is better, and that a class losing more than the tolerance really does
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95


class RayConfig(_Section):
    """Where pretraining runs: Ray Train workers, and where their checkpoints go."""

    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray on this machine
    num_workers: Annotated[int, Field(gt=0)] = 1
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] = 2.0
    storage_path: str | None = None  # None: <workspace>/ray; or a folder, or s3://bucket/prefix
    storage_endpoint_url: str | None = None  # an S3-compatible store, e.g. http://127.0.0.1:8333
    max_failures: Annotated[int, Field(ge=-1)] = 2  # worker-group restarts; -1: no limit
    keep_checkpoints: Annotated[int, Field(gt=0)] = 2
    # malloc of every Ray worker: jemalloc keeping freed pages (tasks.cluster.worker_env); auto: when
    # this machine has libjemalloc.so.2, else the system's
    worker_allocator: Literal["auto", "jemalloc", "system"] = "auto"

    @field_validator("storage_path")
    @classmethod
    def _storage_scheme(cls, v: str | None) -> str | None:
        if v and "://" in v and not v.startswith("s3://"):
            raise ValueError(f"use a folder or s3://bucket/prefix, got {v!r}")
        return v


Port = Annotated[int, Field(ge=1, le=65535)]


class StageTimeouts(_Section):
    """Seconds each stage may run before Prefect fails it (None: no limit)."""

    data: Annotated[float, Field(gt=0)] | None = 3600
    pretrain: Annotated[float, Field(gt=0)] | None = None
    sweep: Annotated[float, Field(gt=0)] | None = None
    promotion: Annotated[float, Field(gt=0)] | None = 900


class OrchestrationConfig(_Section):
    """How Prefect runs the pipeline: retries, caching, results, schedule and new-data triggers."""

    retries: Annotated[int, Field(ge=0)] = 2  # transient failures: S3, the MLflow server, Ray
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 10
    timeouts: StageTimeouts = StageTimeouts()
    cache: bool = True  # stages keyed on data hashes + config + code: a rerun skips what is done
    results: str | None = None  # None: <workspace>/prefect/results; or a folder, or s3://bucket/prefix
    results_endpoint_url: str | None = None  # an S3-compatible store; credentials from the environment
    deployment: str = "retrain"  # ssl-pipeline serve: the deployment's name
    cron: str | None = "0 3 * * 1"  # scheduled retraining; None: no schedule
    timezone: str = "UTC"
    watch: str | None = None  # a folder or s3://bucket/prefix whose new images start a run
    watch_endpoint_url: str | None = None
    poll_seconds: Annotated[float, Field(gt=0)] = 300
    min_new_images: Annotated[int, Field(gt=0)] = 1000

    @field_validator("cron")
    @classmethod
    def _cron_valid(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                CronSim(v, datetime.datetime(2000, 1, 1))
            except CronSimError as e:
                raise ValueError(f"{v!r} is not a cron expression ({e})") from None
        return v

    @field_validator("results", "watch")
    @classmethod
    def _location_scheme(cls, v: str | None) -> str | None:
        if v and "://" in v and not v.startswith("s3://"):
            raise ValueError(f"use a folder or s3://bucket/prefix, got {v!r}")
        return v


class StackConfig(_Section):
    """The local server stack of ``ssl-pipeline stack up``: SeaweedFS S3, PostgreSQL (if installed,
    else SQLite) behind ``mlflow server`` with artifacts in S3, and ``prefect server``; loopback."""

    dir: str | None = None  # None: <workspace>/stack (data, logs, pid files, credentials)
    host: str = "127.0.0.1"
    s3_port: Port = 8333
    mlflow_port: Port = 5000
    prefect_port: Port = 4200
    postgres_port: Port = 5433
    backend: Literal["auto", "postgresql", "sqlite"] = "auto"  # auto: PostgreSQL if installed
    bucket: str = "ssl-pipeline"
    access_key: str | None = None  # None: generated by the first `stack up`, kept in <dir>
    secret_key: str | None = None


class PipelineConfig(_Section):
    profile: str = "default"
    seed: Annotated[int, Field(ge=0)] = 0
    workspace: str = "workspace"
    num_threads: Annotated[int, Field(gt=0)] | None = None
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    promotion: PromotionConfig = PromotionConfig()
    ray: RayConfig = RayConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    stack: StackConfig = StackConfig()

    @model_validator(mode="after")
    def _backbone_suits_method(self) -> PipelineConfig:
        supported = METHODS[self.pretrain.method].backbones
        if supported and self.model.backbone not in supported:
            raise ValueError(
                f"model.backbone: method {self.pretrain.method!r} needs one of {list(supported)},"
                f" got {self.model.backbone!r}"
            )
        return self

    def digest(self, *sections: str) -> str:
        """A short content hash of the named sections (all when none), for cache keys and tags."""
        dump = self.model_dump(mode="json", include=set(sections) if sections else None)
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def workspace_path(self) -> Path:
        return Path(self.workspace)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "method_params":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. pretrain.epochs=5")
    node = tree
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({e})") from e


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        # Model-level validators name the sub-key themselves: "method_params.tau: ...".
        sub_key, sep, rest = message.partition(": ")
        if sep and sub_key.replace(".", "").replace("_", "").isalnum() and " " not in sub_key:
            key, message = f"{key}.{sub_key}" if key else sub_key, rest
        got = "" if err["type"] == "missing" or isinstance(err["input"], dict) else f" (got {err['input']!r})"
        lines.append(f"{source}: {key or '(top level)'}: {message}{got}")
    return "\n".join(lines)


def config_file(path: str | Path | None = None) -> Path:
    """The params file to read: ``path`` when given (a missing one is an error), else
    ``params.yaml`` in the working directory, else the built-in defaults."""
    if path is not None:
        return Path(path)
    local = Path("params.yaml")
    return local if local.exists() else BUILT_IN_PARAMS


def load_config(
    path: str | Path | None = None,
    profile: str = "default",
    overrides: list[str] | tuple[str, ...] = (),
) -> PipelineConfig:
    """Read ``path`` (:func:`config_file`), apply ``profile`` and ``key=value`` overrides, and validate."""
    path = config_file(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    profiles = raw.pop("profiles", None) or {}
    if profile != "default" and profile not in profiles:
        raise ConfigError(f"{path}: unknown profile {profile!r}; known: {['default', *sorted(profiles)]}")
    tree = _deep_merge(raw, profiles.get(profile) or {})
    tree["profile"] = profile
    for assignment in overrides:
        _apply_override(tree, assignment)
    source = f"{path} (profile {profile})" if not overrides else f"{path} (profile {profile}, --set)"
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None
