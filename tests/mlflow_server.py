"""A real MLflow tracking server for tests: `mlflow server` on loopback, on a free port, with its
artifacts proxied to S3 (a ``SeaweedS3``) and its metadata in SQLite or in a throwaway PostgreSQL.

Use: ``with MlflowServer(tmp_path / "mlflow", s3) as server: MlflowClient(server.uri)``. Only the
server holds the S3 credentials: clients reach the artifacts as ``mlflow-artifacts:/`` through it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Literal

from tests.s3_server import HOST, SeaweedS3, free_ports

Backend = Literal["sqlite", "postgresql"]
# What uvicorn and postgres print (in either case) when a port from free_ports() was taken before they
# bound it; uvicorn then exits with code 0.
PORT_TAKEN = "address already in use"


def find_postgres() -> Path:
    """The folder of PostgreSQL's server binaries (`initdb`, `postgres`)."""
    on_path = [Path(found)] if (found := shutil.which("postgres")) else []
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    for postgres in [*on_path, *reversed(debian)]:
        bin_dir = postgres.resolve().parent
        if (bin_dir / "initdb").exists():
            return bin_dir
    raise FileNotFoundError("PostgreSQL's `postgres` and `initdb` were not found: apt-get install postgresql")


class _PortTaken(RuntimeError):
    pass


def _spawn(command: list[str], log_file: Path, **popen: object) -> subprocess.Popen[bytes]:
    with log_file.open("ab") as log:
        # Its own session (process group), so that _stop() ends it and anything it spawns.
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )


def _log_tail(log_file: Path, lines: int = 20) -> str:
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(
    process: subprocess.Popen[bytes], name: str, log_file: Path, ready: Callable[[], bool], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            tail = _log_tail(log_file)
            error = _PortTaken if PORT_TAKEN in tail.lower() else RuntimeError
            raise error(f"{name} exited with code {process.returncode}; {log_file} ends with:\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{name} did not answer within {timeout:.0f} s; {log_file} ends with:\n{_log_tail(log_file)}"
            )
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """``sig`` to the process group, SIGKILL to whatever is left after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class LocalPostgres:
    """A PostgreSQL cluster with one database, on loopback TCP and trust authentication.

    postgres refuses to run as root, so as root it runs as `nobody`, and its cluster lives in a
    private temporary folder instead of ``data_dir``: pytest's temporary folders are mode 0700, which
    `nobody` cannot cross. The cluster is deleted on ``stop()``; the log stays in ``data_dir/logs``.
    """

    def __init__(self, data_dir: Path, port: int, database: str = "mlflow", user: str = "mlflow"):
        self.bin_dir = find_postgres()
        self.data_dir = data_dir
        self.port = port
        self.database = database
        self.user = user
        self.log_file = data_dir / "logs" / "postgres.out"
        self._nobody = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        self._cluster_root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"postgresql://{self.user}@{HOST}:{self.port}/{self.database}"

    def _as_postgres_user(self) -> list[str]:
        if self._nobody is None:
            return []
        return [
            "setpriv",
            f"--reuid={self._nobody.pw_uid}",
            f"--regid={self._nobody.pw_gid}",
            "--clear-groups",
        ]

    def _init_cluster(self) -> Path:
        if self._nobody is None:
            self._cluster_root = self.data_dir
        else:
            self._cluster_root = Path(tempfile.mkdtemp(prefix="mlflow-postgres-"))
            os.chown(self._cluster_root, self._nobody.pw_uid, self._nobody.pw_gid)
        cluster = self._cluster_root / "cluster"
        initdb = [
            *self._as_postgres_user(),
            str(self.bin_dir / "initdb"),
            f"--pgdata={cluster}",
            f"--username={self.user}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        with self.log_file.open("ab") as log:
            run = subprocess.run(
                initdb, stdout=log, stderr=subprocess.STDOUT, cwd=self._cluster_root, check=False
            )
            if run.returncode:
                raise RuntimeError(f"initdb failed; {self.log_file} ends with:\n{_log_tail(self.log_file)}")
        return cluster

    def start(self, timeout: float = 30.0) -> LocalPostgres:
        import psycopg2

        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        cluster = self._init_cluster()
        command = [
            *self._as_postgres_user(),
            str(self.bin_dir / "postgres"),
            *("-D", str(cluster)),
            *("-p", str(self.port)),
            *("-k", str(cluster)),  # its Unix socket: in the cluster, not in /var/run/postgresql
            *("-c", f"listen_addresses={HOST}"),
            # A throwaway database: durability only costs time.
            *("-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"),
        ]
        self._process = _spawn(command, self.log_file, cwd=self._cluster_root)

        def connect():
            return psycopg2.connect(
                host=HOST, port=self.port, user=self.user, dbname="postgres", connect_timeout=2
            )

        def ready() -> bool:
            try:
                connect().close()
            except psycopg2.OperationalError:  # refused, or "the database system is starting up"
                return False
            return True

        _wait_ready(self._process, "postgres", self.log_file, ready, timeout)
        with contextlib.closing(connect()) as connection:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            connection.cursor().execute(f'CREATE DATABASE "{self.database}"')
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _stop(process, signal.SIGINT)  # SIGINT is postgres's fast shutdown: it ends open sessions
        if self._cluster_root is not None and self._cluster_root != self.data_dir:
            shutil.rmtree(self._cluster_root, ignore_errors=True)
        self._cluster_root = None


class MlflowServer:
    """`mlflow server` (one worker) with its logs, working folder and SQLite database under ``data_dir``.

    Artifacts go to ``s3://<bucket>`` on ``s3`` (the bucket is created), proxied by the server.
    ``backend="postgresql"`` puts the metadata in a ``LocalPostgres`` instead, dropped on ``stop()``.
    """

    def __init__(
        self, data_dir: str | Path, s3: SeaweedS3, bucket: str = "mlflow", backend: Backend = "sqlite"
    ):
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"backend must be 'sqlite' or 'postgresql', not {backend!r}")
        self.data_dir = Path(data_dir).resolve()
        self.s3 = s3
        self.bucket = bucket
        self.backend = backend
        self.log_file = self.data_dir / "logs" / "mlflow.out"
        self.port = 0
        self._postgres: LocalPostgres | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _backend_store_uri(self) -> str:
        if self._postgres is not None:
            return self._postgres.uri
        return f"sqlite:///{self.data_dir / 'mlflow.db'}"

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            f"--host={HOST}",
            f"--port={self.port}",
            "--workers=1",
            f"--backend-store-uri={self._backend_store_uri()}",
            f"--artifacts-destination=s3://{self.bucket}",
        ]

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            **self.s3.env(),
            "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint_url,
            # Jobs start a Huey consumer (about 1 GB) that tests do not use.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }

    def _health(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 90.0) -> MlflowServer:
        """Create the bucket, start the backend store and the server, and wait until it answers."""
        if self._process is not None:
            return self
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        s3 = self.s3.client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            s3.create_bucket(Bucket=self.bucket)
        for attempt in range(3):
            ports = free_ports(("mlflow", "postgres"))
            self.port = ports["mlflow"]
            try:
                if self.backend == "postgresql":
                    self._postgres = LocalPostgres(self.data_dir, ports["postgres"])
                    self._postgres.start()
                self._process = _spawn(self._command(), self.log_file, env=self._env(), cwd=self.data_dir)
                _wait_ready(self._process, "mlflow server", self.log_file, self._health, timeout)
                break
            except _PortTaken:
                # Another process took a port between free_ports() and the bind: pick others.
                self.stop()
                if attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _stop(process)
        postgres, self._postgres = self._postgres, None
        if postgres is not None:
            postgres.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
