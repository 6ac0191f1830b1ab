"""``ssl-pipeline stack``: start, stop and inspect the local servers (S3, MLflow, Prefect)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from flows.options import ConfigPath, Overrides, Profile, load
from tasks.config import StackConfig
from tasks.stack import TITLES, ServiceStatus, Stack, StackError, log_tail, stack_overrides

stack_app = typer.Typer(
    help="Real servers on loopback instead of the embedded defaults: SeaweedFS S3, MLflow "
    "(PostgreSQL or SQLite, artifacts in S3) and Prefect, as background processes.",
    no_args_is_help=True,
)
# URLs and paths are for copying: never wrap them. Errors go to stderr, out of `eval "$(... env)"`.
console = Console(soft_wrap=True)
errors = Console(soft_wrap=True, stderr=True)


def _stack(config: Path | None, profile: str, overrides: list[str] | None) -> Stack:
    return Stack(load(config, profile, overrides, errors))


def _fail(message: str) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


def _print_table(stack: Stack, statuses: list[ServiceStatus]) -> None:
    # A pipe's 80 columns would cut URLs and paths, which are for copying.
    (console if console.is_terminal else Console(width=200)).print(_table(stack, statuses))


def _table(stack: Stack, statuses: list[ServiceStatus]) -> Table:
    table = Table(title=f"Stack in {stack.dir}", box=box.SIMPLE_HEAD)
    for column in ("service", "URL", "pid", "healthy", "log"):
        table.add_column(column, no_wrap=True)
    for s in statuses:
        healthy = "[green]yes[/green]" if s.healthy else "[red]no[/red]"
        table.add_row(s.name, s.url, str(s.pid or "-"), healthy, str(s.log.relative_to(stack.dir)))
    return table


def _usage(stack: Stack) -> str:
    """How to point the pipeline at the stack: the environment, then the `stack` profile or --set."""
    overrides = stack_overrides(stack.cfg)
    point = (
        "ssl-pipeline run --profile stack"
        if overrides == stack_overrides(stack.cfg.model_copy(update={"stack": StackConfig()}))
        else "ssl-pipeline run " + " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    )
    return f'Point the pipeline at it:\n  eval "$(ssl-pipeline stack env)"\n  {point}'


@stack_app.command("up")
def up(config: ConfigPath = None, profile: Profile = "default", overrides: Overrides = None) -> None:
    """Start the servers that are not running and wait until all are healthy."""
    stack = _stack(config, profile, overrides)
    try:
        before = stack.status()
        if all(s.healthy for s in before):
            console.print(f"The stack in {stack.dir} is already up.", highlight=False)
            _print_table(stack, before)
            return
        statuses = stack.up(lambda message: console.print(message, highlight=False))
    except StackError as e:
        if e.log is not None and e.log.exists():
            errors.print(f"{e.log} ends with:\n{log_tail(e.log)}", style="dim", highlight=False, markup=False)
        raise _fail(str(e)) from None
    console.print(f"The stack is up in {stack.dir} ({stack.backend} metadata store).", highlight=False)
    _print_table(stack, statuses)
    console.print(_usage(stack), highlight=False)


@stack_app.command("down")
def down(
    purge: Annotated[
        bool, typer.Option(help="Also delete the stack folder: data, logs, credentials.")
    ] = False,
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
) -> None:
    """Stop the servers; their data stays for the next `up` unless --purge."""
    stack = _stack(config, profile, overrides)
    try:
        stopped = stack.down(purge)
    except StackError as e:
        raise _fail(str(e)) from None
    names = ", ".join(TITLES[s] for s in stopped) if stopped else "nothing was running"
    console.print(f"Stopped: {names}.", highlight=False)
    console.print(f"Deleted {stack.dir}." if purge else f"The data stays in {stack.dir}.", highlight=False)


@stack_app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: ConfigPath = None,
    profile: Profile = "default",
    overrides: Overrides = None,
) -> None:
    """Each server's URL, pid, health and log; exit 1 unless all are healthy."""
    stack = _stack(config, profile, overrides)
    try:
        statuses = stack.status()
    except StackError as e:
        raise _fail(str(e)) from None
    if as_json:
        print(json.dumps([s.as_dict() for s in statuses], indent=2))
    else:
        _print_table(stack, statuses)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@stack_app.command("env")
def env(config: ConfigPath = None, profile: Profile = "default", overrides: Overrides = None) -> None:
    """Shell `export` lines for the stack's endpoints and credentials: eval "$(ssl-pipeline stack env)"."""
    stack = _stack(config, profile, overrides)
    try:
        variables = stack.env()
    except StackError as e:
        raise _fail(str(e)) from None
    for key, value in variables.items():
        print(f"export {key}={shlex.quote(value)}")
