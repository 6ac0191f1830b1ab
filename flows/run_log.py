"""A command's whole log in a file; on the console, a user's error without a traceback.

Every record that reaches the root logger (Prefect's flow and task run lines included) goes to
``<workspace>/logs/<command>-<time>.log`` with its traceback. On the console a record whose
exception is the user's to fix (a bad setting, bad data, a server that does not answer) keeps its
one-line message and loses the traceback; the command then prints one sentence and this file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ssl_models.data import DataError
from tasks.config import ConfigError, PipelineConfig

USER_ERRORS = (ConfigError, DataError, ConnectionError)


class _NoUserErrorTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info = record.exc_text = None  # the file handler, first, has written it
        return True


@contextmanager
def run_log(cfg: PipelineConfig, command: str) -> Iterator[Path]:
    """Log to the command's file while the block runs; yields the file's path."""
    folder = cfg.workspace_path / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s - %(message)s"))
    root = logging.getLogger()
    root.handlers.insert(0, to_file)  # before the console's handler: it sees each traceback first
    quiet = _NoUserErrorTraceback()
    consoles = [h for h in root.handlers[1:] if isinstance(h, logging.StreamHandler)]
    for handler in consoles:
        handler.addFilter(quiet)
    try:
        yield path
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)
        root.removeHandler(to_file)
        to_file.close()
