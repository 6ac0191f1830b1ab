"""Rich progress bars for the CLI: one bar per kind of long work (pretraining epochs, sweep
trials), fed by ``tasks.progress``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from tasks import progress


@contextmanager
def progress_bars(console: Console) -> Iterator[Progress]:
    """Bars drawn on ``console`` while the block runs; nothing on a console that is no terminal
    (logs, CI), where the per-epoch and per-trial lines already say how far the run got."""
    bars = Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    ids: dict[str, TaskID] = {}

    def update(what: str, completed: int, total: int) -> None:
        if what not in ids:
            ids[what] = bars.add_task(what, total=total)
        bars.update(ids[what], completed=completed, total=total)

    with bars, progress.listening(update):
        yield bars
