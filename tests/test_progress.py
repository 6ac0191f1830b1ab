"""The CLI's progress bars and what feeds them: reports from the sweep (tests/test_sweep.py) and
the pretraining epochs a thread reads from the MLflow run."""

from __future__ import annotations

import io
import time
from pathlib import Path

from rich.console import Console

from flows.pipeline import _epoch_progress
from flows.progress import progress_bars
from tasks import progress, tracking
from tasks.config import PipelineConfig
from tasks.data import DatasetRef, PreparedData


def test_bars_draw_on_a_terminal_and_stay_silent_in_a_log() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    with progress_bars(terminal):
        progress.report("pretrain epochs", 1, 4)
        progress.report("sweep: search trials", 16, 16)
        progress.report("pretrain epochs", 4, 4)
    drawn = terminal.file.getvalue()  # type: ignore[attr-defined]
    assert "pretrain epochs" in drawn and "4/4" in drawn and "16/16" in drawn
    assert not progress.listened()  # the bars stop listening with the block

    log = Console(file=io.StringIO(), force_terminal=False)
    with progress_bars(log):
        progress.report("pretrain epochs", 2, 4)
    assert log.file.getvalue() == ""  # type: ignore[attr-defined]


def test_epoch_progress_reads_the_epochs_the_run_holds(tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate({"workspace": str(tmp_path / "ws"), "pretrain": {"epochs": 3}})
    ref = DatasetRef("unlabeled", str(tmp_path / "x.pt"), "0" * 64, 8, ())
    run_id = tracking.start_run(cfg, PreparedData(ref, ref, ref, 0.5, 0.25), "pretrain")
    logger = tracking.epoch_logger(cfg, run_id)
    reports: list[tuple[str, int, int]] = []
    with progress.listening(lambda *report: reports.append(report)), _epoch_progress(cfg, run_id, every=0.05):
        for epoch in (1, 2):
            logger({"epoch": epoch, "loss": 1.0 / epoch, "lr": 0.1, "images_per_s": 100.0})
            deadline = time.monotonic() + 10
            while ("pretrain epochs", epoch, 3) not in reports and time.monotonic() < deadline:
                time.sleep(0.05)
    assert ("pretrain epochs", 1, 3) in reports and ("pretrain epochs", 2, 3) in reports
    assert {done for _, done, _ in reports} <= {0, 1, 2}
    with _epoch_progress(cfg, run_id, every=0.05):  # nobody listens: no thread, no reads
        pass
