"""``ssl-pipeline data``: ingest, version (DVC) and move datasets to and from the remote."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from ssl_models.data import DataError

data_app = typer.Typer(
    help="Ingest, version and share datasets (DVC, local or S3 remote).", no_args_is_help=True
)
# Paths and hashes are for copying: never wrap them.
console = Console(soft_wrap=True)

Root = Annotated[Path, typer.Option("--root", help="The git + DVC repository that holds the datasets.")]
Target = Annotated[Path, typer.Argument(help="A dataset folder, e.g. data/unlabeled.")]


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(1)


@data_app.command("init")
def init(
    remote: Annotated[str, typer.Option(help="A folder, or s3://bucket/prefix.")] = "workspace/dvc-remote",
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3-compatible store, e.g. http://127.0.0.1:8333.")
    ] = None,
    root: Root = Path("."),
) -> None:
    """dvc init (if needed) and set the default remote; credentials stay in the environment."""
    from tasks.versioning import init as dvc_init

    dvc_init(root, remote, endpoint_url)
    console.print(f"DVC remote: {remote}" + (f" at {endpoint_url}" if endpoint_url else ""))


@data_app.command("ingest")
def ingest(
    source: Annotated[
        str,
        typer.Argument(
            help="A folder, s3://bucket/prefix, a .csv/.parquet table of path[,label], or an IDX file."
        ),
    ],
    kind: Annotated[str, typer.Option(help="unlabeled | labeled")] = "unlabeled",
    labels: Annotated[Path | None, typer.Option(help="IDX labels file for an IDX images file.")] = None,
    dest: Annotated[Path | None, typer.Option(help="Dataset folder (default data/KIND).")] = None,
    channels: Annotated[int, typer.Option(help="1 (grayscale) or 3 (RGB).")] = 1,
    allow_new_classes: bool = False,
    push: Annotated[bool, typer.Option(help="Push the new version to the DVC remote.")] = True,
    notify: Annotated[
        bool,
        typer.Option(
            help="New unlabeled images: emit the event that starts a served `retrain` (PREFECT_API_URL)."
        ),
    ] = True,
    root: Root = Path("."),
) -> None:
    """Validate SOURCE, add its new images to the dataset as new shards, track the version and push it."""
    from tasks import versioning
    from tasks.data import overlaps
    from tasks.ingest import ImageRules
    from tasks.ingest import ingest as run_ingest
    from tasks.sources import TABLE_SUFFIXES, idx_items, list_source, source_items

    if kind not in ("unlabeled", "labeled") or channels not in (1, 3):
        raise _fail(f"--kind must be unlabeled or labeled and --channels 1 or 3, got {kind!r}, {channels}")
    kind_: Literal["unlabeled", "labeled"] = "labeled" if kind == "labeled" else "unlabeled"
    folder = dest or Path("data") / kind_
    is_idx = not (
        source.startswith("s3://") or Path(source).is_dir() or source.lower().endswith(TABLE_SUFFIXES)
    )

    def items():  # type: ignore[no-untyped-def]
        return idx_items(Path(source), labels) if is_idx else source_items(source, kind_)

    try:
        report = run_ingest(
            items(),
            kind_,
            root / folder,
            ImageRules(channels=1 if channels == 1 else 3),
            quarantine=root / "workspace" / "quarantine" / kind_,
            allow_new_classes=allow_new_classes,
            source=source,
            expected_bytes=list_source(items()).bytes,
        )
    except DataError as e:
        raise _fail(str(e)) from None
    report_path = root / "workspace" / "ingest" / f"{kind_}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    console.print(
        f"{source}: {report.added} added, {report.already_present} already present, "
        f"{report.duplicates_in_source} duplicates, {report.num_quarantined} quarantined "
        f"-> {folder} ({report.total} images, {report.shards_written} new shards); report {report_path}",
    )
    for name, reason in report.quarantined[:10]:
        console.print(f"  quarantined {name}: {reason}")
    for reason, count in sorted(report.skipped.items()):
        console.print(f"  skipped {count}: {reason}", highlight=False)
    siblings = {
        p.name: p for p in (root / folder).parent.iterdir() if p.is_dir() and not p.name.startswith(".")
    }
    for found in overlaps(siblings):
        if folder.name in (found.first, found.second):
            console.print(
                f"  {found.count} images are in both {found.first} and {found.second},"
                f" e.g. {found.examples[0][0]}"
            )
    try:
        version = versioning.track(root, folder)
        console.print(
            f"version {version.short} ({version.files} files, {version.size} bytes):"
            f" commit {folder}.dvc to record it",
        )
        if push:
            console.print(f"pushed {versioning.push(root, folder)} files")
    except versioning.VersioningError as e:
        raise _fail(str(e)) from None
    # Without a Prefect server there is no deployment to trigger (and no ephemeral one to start).
    if notify and kind_ == "unlabeled" and report.added and os.environ.get("PREFECT_API_URL"):
        from tasks import orchestration
        from tasks.watch import Arrival

        arrival = Arrival(str((root / folder).resolve()), report.added, report.total)
        orchestration.emit_data_arrived(arrival, "dataset", flush=True)
        console.print(f"emitted {orchestration.DATA_ARRIVED} ({report.added} new images)")


@data_app.command("convert")
def convert(
    target: Target,
    kind: Annotated[str, typer.Option(help="unlabeled | labeled")] = "unlabeled",
    channels: Annotated[int, typer.Option(help="1 (grayscale) or 3 (RGB).")] = 1,
    root: Root = Path("."),
) -> None:
    """Rewrite a one-PNG-per-image dataset folder as shards and track it (`run` does it too)."""
    from tasks import versioning
    from tasks.data import convert_legacy_folder
    from tasks.ingest import ImageRules, IngestLimits

    kind_: Literal["unlabeled", "labeled"] = "labeled" if kind == "labeled" else "unlabeled"
    try:
        report = convert_legacy_folder(
            root / target, kind_, ImageRules(1 if channels == 1 else 3), IngestLimits()
        )
    except DataError as e:
        raise _fail(str(e)) from None
    if report is None:
        console.print(f"{target}: nothing to convert (not a folder of PNG files)")
        return
    try:
        version = versioning.track(root, target)
    except versioning.VersioningError as e:
        raise _fail(str(e)) from None
    console.print(
        f"{target}: {report.added} images in {report.shards_written} shards, version {version.short}:"
        f" commit {target}.dvc to record it"
    )


@data_app.command("status")
def status(target: Target, cloud: bool = True, root: Root = Path(".")) -> None:
    """What changed in the dataset since its last version, and what the remote lacks."""
    from tasks import versioning

    try:
        changes = versioning.status(root, target, cloud=cloud)
        version = versioning.current_version(root, target)
    except versioning.VersioningError as e:
        raise _fail(str(e)) from None
    console.print(f"{target}: version {version.short if version else '(never tracked)'}")
    console.print_json(json.dumps(changes) if changes else '"up to date"')


@data_app.command("push")
def push(target: Target, root: Root = Path(".")) -> None:
    """Upload the tracked version of the dataset to the remote."""
    from tasks import versioning

    try:
        console.print(f"pushed {versioning.push(root, target)} files")
    except versioning.VersioningError as e:
        raise _fail(str(e)) from None


@data_app.command("pull")
def pull(target: Target, root: Root = Path(".")) -> None:
    """Download the tracked version of the dataset from the remote."""
    from tasks import versioning

    try:
        versioning.pull(root, target)
    except versioning.VersioningError as e:
        raise _fail(str(e)) from None
    console.print(f"{target}: pulled")


@data_app.command("versions")
def versions(target: Target, root: Root = Path(".")) -> None:
    """Every committed version of the dataset: commit, date, DVC hash, files."""
    from tasks import versioning

    for commit, date, version in versioning.versions(root, target):
        console.print(f"{commit[:10]}  {date}  {version.md5}  {version.files} files")
