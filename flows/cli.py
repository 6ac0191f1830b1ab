"""``ssl-pipeline``: the command line. Heavy libraries are imported inside commands."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from flows.data_cli import data_app
from flows.options import ConfigPath, Overrides, Profile, load
from flows.stack_cli import stack_app
from tasks.config import ConfigError, EvaluateConfig, PipelineConfig, config_file
from tasks.evaluate import PROTOCOLS, LabelBudget, PairedGain

app = typer.Typer(
    help="Self-supervised transfer learning: data -> pretraining -> evaluation -> registry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
T = TypeVar("T")
app.add_typer(data_app, name="data")
app.add_typer(stack_app, name="stack")

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def _load(config: Path | None, profile: str, overrides: list[str] | None) -> PipelineConfig:
    return load(config, profile, overrides, console)


def _checked(cfg: PipelineConfig, command: str) -> list[str]:
    """The checks before work (``tasks.preflight``): what they found, or one sentence and the exit code."""
    from tasks.preflight import preflight

    try:
        return preflight(cfg)
    except Exception as e:
        console.print(
            f"[red]ssl-pipeline {command}: check failed:[/red] {e}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(exit_code(e)) from None


def _flow_result(cfg: PipelineConfig, command: str, flow: Callable[[], T]) -> T:
    """``flow()`` with the command's whole log in the workspace (``flows.run_log``); a failure is
    one sentence, the log's path and an exit code (:func:`exit_code`)."""
    from flows.run_log import run_log

    with run_log(cfg, command) as log:
        try:
            return flow()
        except Exception as e:
            console.print(
                f"[red]ssl-pipeline {command} failed:[/red] {type(e).__name__}: {e}\n"
                f"The whole log, with the traceback: {log}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(exit_code(e)) from None


def exit_code(error: BaseException) -> int:
    """2: a bad setting, 3: bad data, 4: a server that does not answer, 1: anything else."""
    from ssl_models.data import DataError

    for kind, code in ((ConfigError, 2), (DataError, 3), (ConnectionError, 4)):
        if isinstance(error, kind):
            return code
    return 1


def prepare_environment(cfg: PipelineConfig) -> None:
    """Embedded defaults, set before Prefect is imported; the user's environment wins."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    if "PREFECT_API_URL" not in os.environ:
        home = Path(os.environ.setdefault("PREFECT_HOME", str((cfg.workspace_path / "prefect").resolve())))
        home.mkdir(parents=True, exist_ok=True)
        # A busy 2-core machine can miss the ephemeral server's 20 s start-up default.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # One-file downloads (a checkpoint, a model's files) drew a progress bar each in the run's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def results_table(output, ev: EvaluateConfig) -> Table:  # type: ignore[no-untyped-def]
    """A sweep's cells: test accuracy mean +- std over seeds, per label budget and protocol."""
    selection = (
        f"{ev.selection_share:.0%} of them held out to pick configs on"
        if ev.selection == "budget"
        else f"the {ev.validation_size}-label validation split configs are picked on included"
    )
    table = Table(
        title=f"Test accuracy (top-1), mean ± std over seeds; {output.name}",
        caption=f"labels: every label a cell used ({selection})",
    )
    for column in ("labels", "kNN", "linear probe", "fine-tune", "distilled", "supervised (scratch)"):
        table.add_column(column, justify="right")
    for budget in sorted({c.budget for c in output.cells}, key=LabelBudget.sort_key):
        cells = {
            c.protocol: f"{100 * c.mean:.1f}" + (f" ± {100 * c.std:.1f}" if len(c.seeds) > 1 else "")
            for c in output.cells
            if c.budget == budget
        }
        n = next(c.num_labels for c in output.cells if c.budget == budget)
        table.add_row(
            f"{budget} ({n})",
            *(cells.get(p, "-") for p in PROTOCOLS),
        )
    return table


def print_sweep(cfg: PipelineConfig, output) -> dict[LabelBudget, PairedGain]:  # type: ignore[no-untyped-def]
    console.print(results_table(output, cfg.evaluate))
    primary = cfg.evaluate.primary_protocol
    gains = output.gains_over_supervised(primary)
    for budget, gain in sorted(gains.items(), key=lambda item: item[0].sort_key()):
        interval = (
            f", 95% interval {100 * gain.interval[0]:+.1f} to {100 * gain.interval[1]:+.1f}"
            if gain.interval
            else ""
        )
        console.print(
            f"With {budget.phrase}, {primary} from the pretrained encoder is "
            f"{100 * gain.mean:+.1f} points over supervised from scratch{interval} "
            f"(paired over {len(gain.seeds)} seeds: each seed the same labels, grid and budget for both)."
        )
    stopped = sum(t.stopped_early for t in output.trials)
    console.print(
        f"{len(output.trials)} trials in {output.seconds:.0f} s, {stopped} stopped early by ASHA; "
        f"best model: {output.best_cell}. Figures in {output.folder}.",
        highlight=False,
    )
    return gains


@app.command()
def run(
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
    report: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    refresh: Annotated[bool, typer.Option(help="Recompute every stage, ignoring cached results.")] = False,
    only_if_new_data: Annotated[
        bool, typer.Option(help="End after the data step if the champion was trained on these datasets.")
    ] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Only the checks before work (servers, labels, images, disk).")
    ] = False,
) -> None:
    """Run the whole pipeline (Prefect flow) with the embedded defaults.

    Everything that can be known before work is checked first (``--check``: only that).
    Finished stages are cached: a rerun resumes where a crash stopped it, and a rerun on the
    same data, config and code reaches the registry without training.

    Exit codes: 0 done, 1 an unexpected error, 2 a bad setting, 3 bad data, 4 a server that
    does not answer.
    """
    cfg = _load(config, profile, overrides)
    start = time.perf_counter()
    checked = _checked(cfg, "run")  # before Prefect, the data step or the cluster start
    if check:
        console.print("\n".join(f"ok  {line}" for line in checked), highlight=False, soft_wrap=True)
        console.print(f"Checks passed in {time.perf_counter() - start:.1f} s.", highlight=False)
        return
    prepare_environment(cfg)
    from flows.pipeline import ssl_pipeline
    from flows.progress import progress_bars

    with progress_bars(console):
        result = _flow_result(
            cfg, "run", lambda: ssl_pipeline(cfg, only_if_new_data=only_if_new_data, refresh=refresh)
        )
    seconds = time.perf_counter() - start
    summary: dict[str, object] = {"profile": cfg.profile, "data_sha256": result.data.digests()}
    if result.skipped or not (result.pretraining and result.sweep and result.promotion):
        console.print(f"Nothing to do: {result.skipped}. {seconds:.0f} s.", highlight=False, soft_wrap=True)
        summary.update(skipped=result.skipped, wall_seconds=round(seconds, 1))
    else:
        gains = print_sweep(cfg, result.sweep.sweep)
        outcome = result.promotion
        console.print(
            f"MLflow runs: pretraining {result.pretraining.run_id}, sweep {result.sweep.run_id}.\n"
            f"Registered model '{cfg.tracking.registered_model}': {outcome.summary()}.\n"
            f"The champion is version {outcome.champion}. {seconds:.0f} s.",
            highlight=False,
            soft_wrap=True,  # one line per sentence, whatever the terminal's width: easy to grep
        )
        summary.update(_run_summary(cfg, result.pretraining, result.sweep, outcome, gains, seconds))
    if report:
        summary["command"] = " ".join(["ssl-pipeline", *sys.argv[1:]])
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(summary, indent=2) + "\n")


def _run_summary(cfg, pretraining, swept, outcome, gains, seconds) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """What ``run --report`` writes about a run that trained."""
    return {
        "method": cfg.pretrain.method,
        "backbone": cfg.model.backbone,
        "pretrain_epochs": cfg.pretrain.epochs,
        "unlabeled_images": pretraining.data.unlabeled.num_images,
        "wall_seconds": round(seconds, 1),
        "pretrain_images_per_s": [round(r["images_per_s"]) for r in pretraining.pretrain.history],
        "pretrain_resumed_from_step": pretraining.pretrain.resumed_from_step,
        "accuracy": swept.sweep.curve(),
        "sweep_seconds": round(swept.sweep.seconds, 1),
        "trials": len(swept.sweep.trials),
        "stopped_early": sum(t.stopped_early for t in swept.sweep.trials),
        "primary_protocol": cfg.evaluate.primary_protocol,
        "gain_over_supervised": {b.name: round(g.mean, 4) for b, g in gains.items()},
        "gain_interval_95": {
            b.name: [round(x, 4) for x in g.interval] for b, g in gains.items() if g.interval
        },
        "gains_by_protocol": {  # every pretrained protocol minus scratch, paired by seed
            protocol: {
                b.name: {
                    "mean": round(g.mean, 4),
                    "interval_95": g.interval and [round(x, 4) for x in g.interval],
                }
                for b, g in swept.sweep.gains_over_supervised(protocol).items()
            }
            for protocol in PROTOCOLS[:-1]
            if swept.sweep.gains_over_supervised(protocol)
        },
        "pretrain_run_id": pretraining.run_id,
        "sweep_run_id": swept.run_id,
        "model_version": outcome.version,
        "registered": outcome.registered,
        "promotion": outcome.decision.outcome,
        "promotion_reason": outcome.decision.reason,
        "champion_version": outcome.champion,
    }


@app.command()
def sweep(
    pretrain_run: Annotated[
        str, typer.Option("--pretrain-run", help="The MLflow run of a pretraining (ssl-pipeline pretrain).")
    ],
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
) -> None:
    """Ray Tune sweep of the label-efficiency protocols on a pretraining run's encoder."""
    cfg = _load(config, profile, overrides)
    _checked(cfg, "sweep")
    prepare_environment(cfg)
    from flows.pipeline import ssl_sweep

    result = _flow_result(cfg, "sweep", lambda: ssl_sweep(cfg, pretrain_run))
    print_sweep(cfg, result.sweep)
    console.print(f"MLflow sweep run {result.run_id}; model {result.model_uri}.", highlight=False)


@app.command()
def pretrain(
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
) -> None:
    """Version the data and pretrain on Ray (local, or the cluster at RAY_ADDRESS); one MLflow run.

    Run again with the same data and config to resume from the latest checkpoint.
    """
    cfg = _load(config, profile, overrides)
    _checked(cfg, "pretrain")
    prepare_environment(cfg)
    from flows.pipeline import ssl_pretraining

    result = _flow_result(cfg, "pretrain", lambda: ssl_pretraining(cfg))
    out = result.pretrain
    table = Table(
        title=f"Pretraining {cfg.pretrain.method} / {cfg.model.backbone} on {cfg.ray.num_workers} workers"
    )
    for column in ("epoch", "loss", "lr", "images/s"):
        table.add_column(column, justify="right")
    for row in out.history:
        table.add_row(
            str(row["epoch"]), f"{row['loss']:.4f}", f"{row['lr']:.2e}", f"{row['images_per_s']:.0f}"
        )
    console.print(table)
    resumed = f", resumed from step {out.resumed_from_step}" if out.resumed_from_step else ""
    console.print(
        f"{out.steps} steps{resumed}. Checkpoint {out.checkpoint_uri}; MLflow run {result.run_id}.",
        highlight=False,
    )


@app.command()
def methods() -> None:
    """List the registered SSL methods and backbones."""
    from ssl_models import BACKBONES, METHODS

    table = Table(title="Self-supervised methods")
    table.add_column("method", no_wrap=True)
    table.add_column("backbones", no_wrap=True)
    table.add_column("defaults (pretrain.method_params)")
    for name, cls in sorted(METHODS.items()):
        defaults = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in vars(cls.Params()).items()
        )
        table.add_row(name, ", ".join(cls.backbones) if cls.backbones else "any", defaults)
    console.print(table)
    console.print("Backbones: " + ", ".join(sorted(BACKBONES)))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="prepare | pretrain | sweep")],
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
) -> None:
    """Run one step as a DVC stage (dvc.yaml; `dvc repro` runs them in order)."""
    cfg = _load(config, profile, overrides)
    prepare_environment(cfg)
    from flows.stages import run_stage

    console.print(f"{name}: wrote {run_stage(name, cfg)}")


def _registry_call(what: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Run a registry operation; a refusal or a server error ends the command with one sentence."""
    from mlflow.exceptions import MlflowException

    from tasks.registry import PromotionError

    try:
        return fn(*args, **kwargs)
    except PromotionError as e:
        console.print(f"[red]{what}:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    except (MlflowException, OSError) as e:
        console.print(f"[red]{what} failed, the registry is unchanged:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="The registered model version to promote.")],
    force: Annotated[bool, typer.Option(help="Promote even if the gate says no (needs --reason).")] = False,
    reason: Annotated[str | None, typer.Option(help="Why the gate is overruled (kept in the tags).")] = None,
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
) -> None:
    """Put a version through the promotion gate against the champion; exit 1 if it is not promoted."""
    cfg = _load(config, profile, overrides)
    prepare_environment(cfg)
    from tasks.registry import promote as promote_version

    outcome = _registry_call("promote", promote_version, cfg, version, force, reason)
    console.print(outcome.summary(), highlight=False, soft_wrap=True)
    if not outcome.decision.promote:
        raise typer.Exit(1)


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why (kept in the demoted version's tags).")] = "rollback",
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
) -> None:
    """Move the champion alias back to the previous champion."""
    cfg = _load(config, profile, overrides)
    prepare_environment(cfg)
    from tasks.registry import rollback as rollback_champion

    done = _registry_call("rollback", rollback_champion, cfg, reason)
    after = f"; previous-champion is now version {done.previous_champion}" if done.previous_champion else ""
    console.print(
        f"Champion rolled back from version {done.demoted} to version {done.champion}{after}.",
        highlight=False,
    )


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
) -> None:
    """The registered model's versions: aliases, test accuracy, data hashes, promotion outcome."""
    cfg = _load(config, profile, overrides)
    prepare_environment(cfg)
    from tasks.registry import version_summaries

    rows = _registry_call("models", version_summaries, cfg)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"Registered model {cfg.tracking.registered_model}")
    for column in ("version", "aliases", "test acc. %", "test data", "labeled data", "gate", "best cell"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["version"],
            ", ".join(row["aliases"]),
            _percent(row["test_accuracy"]),
            (row["test_sha256"] or "-")[:12],
            (row["labeled_sha256"] or "-")[:12],
            row["promotion"] or "-",
            row["best_cell"] or "-",
        )
    console.print(table if rows else "No versions registered yet.")


@app.command()
def lineage(
    uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a tree.")] = False,
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
) -> None:
    """Data versions -> code -> pretraining run -> sweep run -> model version."""
    cfg = _load(config, profile, overrides)
    prepare_environment(cfg)
    from rich.tree import Tree

    from tasks.registry import lineage as model_lineage

    chain = _registry_call("lineage", model_lineage, cfg, uri)
    if as_json:
        print(json.dumps(chain, indent=2))
        return
    model = chain["model"]
    aliases = f" ({', '.join(model['aliases'])})" if model["aliases"] else ""
    tree = Tree(f"{uri}: {model['name']} version {model['version']}{aliases}")
    data = tree.add("data")
    for split, ref in chain["data"].items():
        dvc, sha = ref["dvc_md5"] or "-", ref["sha256"] or "-"
        data.add(f"{split}: DVC md5 {dvc}, sha256 {sha}, {ref['num_images'] or '?'} images")
    code = chain["code"]
    ssl = chain["ssl"]
    tree.add(
        f"code: git {code['git_commit'] or '-'}, config sha256 {code['config_sha256'] or '-'}; "
        f"{ssl['method']} on {ssl['backbone']} ({ssl['profile']} profile)"
    )
    for label, run in (("pretraining", chain["pretraining_run"]), ("sweep", chain["sweep_run"])):
        if run is None:
            tree.add(f"{label} run: -")
            continue
        details = ", ".join(f"{k} {v:.4g}" for k, v in run.get("metrics", {}).items())
        extra = f", best cell {run['best_cell']}" if run.get("best_cell") else ""
        state = "missing" if run.get("missing") else run.get("status")
        tree.add(f"{label} run {run['run_id']} ({state}{extra}{', ' + details if details else ''})")
    promotion = chain["promotion"]
    accuracy = chain["evaluation"]["test_accuracy"] if chain["evaluation"] else None
    tree.add(
        f"model version {model['version']}: test accuracy {_percent(accuracy)}%, "
        f"gate {promotion.get('outcome', '-')}: {promotion.get('reason', '-')}"
    )
    console.print(tree, highlight=False)


@app.command()
def serve(config: ConfigPath = None, profile: Profile = "default", overrides: Overrides = None) -> None:
    """Serve scheduled and triggered retraining: the `retrain` deployment with the config's cron
    schedule, a trigger on new unlabeled images, and a watch on orchestration.watch."""
    cfg = _load(config, profile, overrides)
    prepare_environment(cfg)
    from flows.deployment import serve_retraining

    o = cfg.orchestration
    console.print(
        f"Serving deployment 'retrain/{o.deployment}': schedule {o.cron or 'none'} ({o.timezone}); "
        + (
            f"watching {o.watch} every {o.poll_seconds:g} s for {o.min_new_images} new images."
            if o.watch
            else "no watched location (orchestration.watch)."
        ),
        highlight=False,
        soft_wrap=True,
    )
    try:
        serve_retraining(cfg, str(config_file(config)), profile, list(overrides or []))
    except KeyboardInterrupt:
        console.print("Stopped serving.")


ModelUri = Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/MODEL")]


def _classifier(cfg: PipelineConfig, uri: str):  # type: ignore[no-untyped-def]
    """The model's classifier, or exit 4 (server) / 1 (no such model) with one sentence."""
    from mlflow.exceptions import MlflowException

    from tasks.serving import load_classifier
    from tasks.tracking import client_for

    client_for(cfg)  # the configured tracking and registry URIs
    try:
        return load_classifier(uri)
    except MlflowException as e:
        console.print(f"[red]error:[/red] {uri}: {str(e).splitlines()[0]}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as e:
        console.print(
            f"[red]error:[/red] {uri}: cannot load the model ({e})", highlight=False, soft_wrap=True
        )
        raise typer.Exit(4) from None


@app.command()
def export(
    uri: ModelUri,
    format: Annotated[str, typer.Option("--format", "-f", help="onnx | torchscript | state-dict")] = "onnx",
    out: Annotated[Path, typer.Option(help="The folder to write.")] = Path("export"),
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
) -> None:
    """Write a model's encoder and classifier for other frameworks, with a README of the preprocessing."""
    from ssl_models.export import FORMATS, export_classifier

    if format not in FORMATS:
        console.print(
            f"[red]error:[/red] --format {format}: choose one of {', '.join(FORMATS)}", highlight=False
        )
        raise typer.Exit(2)
    cfg = _load(config, profile, overrides)
    classifier = _classifier(cfg, uri)
    written = export_classifier(classifier, out, format)  # type: ignore[arg-type]
    console.print(f"Wrote {', '.join(str(p) for p in written)}.", highlight=False, soft_wrap=True)


@app.command()
def predict(
    uri: ModelUri,
    images: Annotated[
        str, typer.Argument(help="A folder, s3://bucket/prefix, or a .csv/.parquet table of path.")
    ],
    out: Annotated[Path, typer.Option(help="The CSV to write: path, class, probability, error.")] = Path(
        "predictions.csv"
    ),
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
) -> None:
    """Classify every image of a folder (or S3 prefix, or table) with a model, streaming, into a CSV."""
    from rich.progress import Progress

    from ssl_models.data import DataError
    from tasks.predict import predict_to_csv
    from tasks.sources import list_source, source_items

    cfg = _load(config, profile, overrides)
    endpoint = cfg.data.source_endpoint_url
    try:
        total = list_source(source_items(images, "unlabeled", endpoint)).count
    except (DataError, OSError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(3) from None
    classifier = _classifier(cfg, uri)
    s3_client = None
    if images.startswith("s3://"):
        from tasks.s3 import shared_client

        s3_client = shared_client(endpoint)
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("classifying", total=total)
        report = predict_to_csv(
            classifier,
            source_items(images, "unlabeled", endpoint),
            out,
            s3_client,
            on_batch=lambda n: progress.advance(bar, n),
        )
    console.print(
        f"Classified {report.classified} of {report.images} images into {out}"
        + (f"; {report.failed} could not be read (their reason in the error column)" if report.failed else "")
        + (f"; {report.skipped} entries are no image files" if report.skipped else "")
        + ".",
        highlight=False,
        soft_wrap=True,
    )


SourceOption = Annotated[
    str | None,
    typer.Option(
        help="A folder (one sub-folder a class for labeled and test), s3://bucket/prefix, or a label table."
    ),
]


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="The project's folder, made if missing.")] = Path("."),
    unlabeled: SourceOption = None,
    labeled: SourceOption = None,
    test: SourceOption = None,
    endpoint_url: Annotated[
        str | None, typer.Option(help="An S3-compatible store for s3:// sources (credentials: environment).")
    ] = None,
    channels: Annotated[
        int | None, typer.Option(min=1, max=3, help="1 or 3 [default: from the first labeled image].")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Pixels a side for training [default: from the first labeled image].")
    ] = None,
) -> None:
    """Make a project: a commented params.yaml for your images, .gitignore, git and DVC.

    Without --unlabeled, --labeled and --test the project is the Fashion-MNIST demo.
    """
    from ssl_models.data import DataError
    from tasks.project import Sources, make_project

    given = [s for s in (unlabeled, labeled, test) if s]
    if given and len(given) < 3:
        console.print("[red]error:[/red] give --unlabeled, --labeled and --test together", highlight=False)
        raise typer.Exit(2)
    sources = Sources(unlabeled, labeled, test, endpoint_url) if unlabeled and labeled and test else None
    try:
        project = make_project(folder, sources, channels, image_size)
    except (FileExistsError, DataError, ConfigError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    data = project.data
    console.print(
        f"Made a project in {project.folder}: {', '.join(project.done)}.\n"
        + (
            f"Images: unlabeled {data['unlabeled_dir']}, labeled {data['labeled_dir']}, "
            f"test {data['test_dir']}"
            if sources
            else "Images: Fashion-MNIST (the demo; --unlabeled, --labeled and --test give your own)"
        )
        + f"; {data['channels']} channel(s) at {data['image_size']} px"
        + (f" (from {project.detected})" if project.detected else "")
        + f".\nNext: cd {folder} && ssl-pipeline run",
        highlight=False,
        soft_wrap=True,
    )


@app.command("config")
def show_config(config: ConfigPath = None, profile: Profile = "default", overrides: Overrides = None) -> None:
    """Validate and print the resolved configuration."""
    console.print_json(_load(config, profile, overrides).model_dump_json())


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def bench_names() -> list[str]:
    """The benchmarks of a source checkout: bench/<name>.py with a ``main``."""
    if not BENCH_DIR.is_dir():
        return []
    return sorted(
        p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_") and "def main(" in p.read_text()
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The benchmark: bench/NAME.py (its own options follow).")],
) -> None:
    """Run a benchmark of bench/ (python -m bench.NAME); it writes its JSON to bench/results/."""
    names = bench_names()
    if name not in names:
        listed = ", ".join(names) or "none: bench/ comes with a source checkout"
        console.print(f"[red]error:[/red] no benchmark {name!r}; choose one of: {listed}", highlight=False)
        raise typer.Exit(2)
    import importlib

    root = str(BENCH_DIR.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    sys.argv = [f"ssl-pipeline bench {name}", *ctx.args]
    importlib.import_module(f"bench.{name}").main()  # argparse reads sys.argv


def main() -> None:
    app()


if __name__ == "__main__":
    main()
