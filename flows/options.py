"""The options every command takes (``--config``, ``--profile``, ``--set``) and loading them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tasks.config import ConfigError, PipelineConfig, load_config

ConfigPath = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="The params file [default: ./params.yaml, else the built-in one]."),
]
Profile = Annotated[
    str,
    typer.Option(
        "--profile",
        "-p",
        envvar="SSL_PIPELINE_PROFILE",
        help="smoke | default | full | stack, or any profile in the file.",
    ),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a key, e.g. --set pretrain.epochs=5 (repeatable)."),
]


def load(config: Path | None, profile: str, overrides: list[str] | None, console: Console) -> PipelineConfig:
    """The validated config, or the errors (naming each key) on ``console`` and exit code 2."""
    try:
        return load_config(config, profile, overrides or [])
    except ConfigError as e:
        console.print(f"[red]Invalid configuration:[/red]\n{e}", highlight=False)
        raise typer.Exit(2) from None
