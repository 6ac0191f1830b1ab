"""Joining the configured Ray cluster, or starting one on this machine: what every Ray step does first."""

from __future__ import annotations

import ctypes.util
import logging
import os
import socket
import sys

import ray

from tasks.config import PipelineConfig

JEMALLOC = "libjemalloc.so.2"
# Freed pages stay with the process for reuse: PyTorch frees and reallocates its activation
# buffers every step, and memory handed back to the OS costs a page fault per page on the next
# one (glibc maps and unmaps its large buffers): a 96 px training epoch on the CPU ran 1.65x faster
# this way (bench/results/allocator.json). A worker's memory stays at its peak, reached every step.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def worker_env(cfg: PipelineConfig) -> dict[str, str]:
    """Environment variables every Ray worker of this job starts with: the allocator.

    ``ray.worker_allocator``: ``jemalloc`` preloads ``libjemalloc.so.2`` into the workers (an
    error when this machine lacks it), ``auto`` does so when it is found, ``system`` leaves
    malloc alone. Variables already set in the environment are the user's and stay as they are.
    """
    choice = cfg.ray.worker_allocator
    if choice == "system" or sys.platform != "linux":
        return {}
    if ctypes.util.find_library("jemalloc") is None:
        if choice == "jemalloc":
            raise ValueError(
                f"ray.worker_allocator: jemalloc, but {JEMALLOC} is not installed on this machine "
                "(Debian/Ubuntu: apt-get install libjemalloc2); set it to auto or system"
            )
        return {}
    wanted = {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": JEMALLOC_CONF}
    return {k: v for k, v in wanted.items() if k not in os.environ}


def cluster_address(cfg: PipelineConfig) -> str | None:
    """The Ray cluster to join: ``ray.address``, else ``RAY_ADDRESS``; None: start one here."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def require_reachable(cfg: PipelineConfig) -> None:
    """Fail at once, naming the setting, when the configured cluster's address does not answer
    (Ray itself would retry for minutes); the commands check this before any work."""
    address = cluster_address(cfg)
    if address and address not in ("auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as e:
            raise ConnectionError(
                f"cannot reach the Ray cluster at {address!r} (ray.address or RAY_ADDRESS): {e}"
            ) from None


def connect(cfg: PipelineConfig) -> None:
    """Join the configured Ray cluster (:func:`cluster_address`), or start one here."""
    if ray.is_initialized():
        return
    require_reachable(cfg)
    address = cluster_address(cfg)
    env = worker_env(cfg)
    # Ray's own INFO/WARNING lines (and, without the dashboard package, a state-API warning
    # every few seconds) drown the training progress; errors still show.
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        runtime_env={"env_vars": env} if env else None,
    )
