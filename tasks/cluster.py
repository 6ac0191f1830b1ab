"""Joining the configured Ray cluster, or starting one on this machine: what every Ray step does first."""

from __future__ import annotations

import logging
import os
import socket

import ray

from tasks.config import PipelineConfig


def connect(cfg: PipelineConfig) -> None:
    """Join the configured Ray cluster (``ray.address``, else ``RAY_ADDRESS``), or start one here.

    An unreachable address fails at once, naming the setting; Ray itself would retry for minutes.
    """
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as e:
            raise ConnectionError(
                f"cannot reach the Ray cluster at {address!r} (ray.address or RAY_ADDRESS): {e}"
            ) from None
    # Ray's own INFO/WARNING lines (and, without the dashboard package, a state-API warning
    # every few seconds) drown the training progress; errors still show.
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        logging_config=ray.LoggingConfig(log_level="ERROR"),
    )
