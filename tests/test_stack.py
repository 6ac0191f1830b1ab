"""``ssl-pipeline stack``: config -> commands, credentials, overrides, the compose file and Dockerfile,
and (slow) a real up -> status -> down -> up -> down --purge on free ports."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.stack_cli import _usage, stack_app
from tasks import stack
from tasks.config import ConfigError, PipelineConfig, StackConfig, load_config
from tests.conftest import REPO

PARAMS = REPO / "params.yaml"
COMPOSE = REPO / "infra" / "docker-compose.yml"
DOCKERFILE = REPO / "infra" / "Dockerfile"
runner = CliRunner()


def stack_sets(folder: Path, **keys: object) -> list[str]:
    return [f"stack.dir={folder}", *(f"stack.{key}={value}" for key, value in keys.items())]


def config(folder: Path, **keys: object) -> PipelineConfig:
    return load_config(PARAMS, "default", stack_sets(folder, **keys))


def cli_args(folder: Path, **keys: object) -> list[str]:
    return ["--config", str(PARAMS), *(f"--set={s}" for s in stack_sets(folder, **keys))]


def test_commands_follow_the_config(tmp_path: Path) -> None:
    cfg = config(tmp_path, s3_port=21000, mlflow_port=21100, prefect_port=21200, postgres_port=21300)
    s = stack.Stack(cfg)
    creds = s.credentials(create=True)
    assert creds is not None

    weed, weed_env = s._command("s3", creds)
    assert Path(weed[0]).name == "weed" and weed[2] == "mini" and weed_env == {}
    for i, server in enumerate(stack.WEED_SERVERS):
        assert f"-{server}.port={21000 + i}" in weed
        assert f"-{server}.port.grpc={31000 + i}" in weed
    assert f"-dir={tmp_path / 's3'}" in weed and "-master.telemetry=false" in weed
    identity = json.loads((tmp_path / "s3.json").read_text())["identities"][0]["credentials"][0]
    assert identity == {"accessKey": creds.access_key, "secretKey": creds.secret_key}
    assert (tmp_path / "s3.json").stat().st_mode & 0o777 == 0o600

    mlflow, mlflow_env = s._command("mlflow", creds)
    assert mlflow[1:2] == ["server"] and "--port=21100" in mlflow and "--host=127.0.0.1" in mlflow
    assert "--artifacts-destination=s3://ssl-pipeline/mlflow" in mlflow and "--workers=1" in mlflow
    assert f"--backend-store-uri={s.backend_store_uri()}" in mlflow
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:21000"
    assert mlflow_env["AWS_SECRET_ACCESS_KEY"] == creds.secret_key
    assert mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert not any(creds.postgres_password in arg for arg in mlflow)  # ps shows the command line

    prefect, prefect_env = s._command("prefect", creds)
    assert prefect[1:] == ["server", "start", "--host=127.0.0.1", "--port=21200"]
    assert prefect_env["PREFECT_HOME"] == str(tmp_path / "prefect")

    if stack.find_postgres() is not None:
        postgres, _ = s._command("postgres", creds)
        assert postgres[postgres.index("-p") + 1] == "21300"
        assert postgres[postgres.index("-D") + 1] == str(tmp_path / "postgres")
        assert (os.geteuid() == 0) == (Path(postgres[0]).name == "setpriv")


def test_backend_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sqlite = stack.Stack(config(tmp_path / "a", backend="sqlite"))
    assert sqlite.services == ("s3", "mlflow", "prefect")
    assert sqlite.backend_store_uri() == f"sqlite:///{tmp_path / 'a' / 'mlflow' / 'mlflow.db'}"

    postgres = stack.Stack(config(tmp_path / "b", backend="postgresql", postgres_port=6543))
    assert postgres.services == stack.SERVICES
    assert postgres.backend_store_uri() == "postgresql://mlflow@127.0.0.1:6543/mlflow"

    # auto: PostgreSQL if installed, but a stack keeps the store its folder already holds.
    monkeypatch.setattr(stack, "find_postgres", lambda: None)
    assert stack.Stack(config(tmp_path / "c")).backend == "sqlite"
    (tmp_path / "d" / "postgres").mkdir(parents=True)
    (tmp_path / "d" / "postgres" / "PG_VERSION").write_text("15\n")
    assert stack.Stack(config(tmp_path / "d")).backend == "postgresql"
    monkeypatch.setattr(stack, "find_postgres", lambda: Path("/usr/lib/postgresql/15/bin"))
    assert stack.Stack(config(tmp_path / "c")).backend == "postgresql"
    (tmp_path / "e" / "mlflow").mkdir(parents=True)
    (tmp_path / "e" / "mlflow" / "mlflow.db").touch()
    assert stack.Stack(config(tmp_path / "e")).backend == "sqlite"


def test_credentials_are_generated_once_and_kept_private(tmp_path: Path) -> None:
    s = stack.Stack(config(tmp_path))
    assert s.credentials() is None
    with pytest.raises(stack.StackError, match="stack up"):
        stack.env(s.cfg)
    first = s.credentials(create=True)
    assert first is not None
    path = tmp_path / "credentials.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert stack.Stack(config(tmp_path)).credentials(create=True) == first
    assert len({first.access_key, first.secret_key, first.postgres_password}) == 3
    # Keys given in the config win, and are saved; the generated PostgreSQL password stays.
    given = stack.Stack(config(tmp_path, access_key="AKGIVEN", secret_key="given-secret"))
    creds = given.credentials(create=True)
    assert creds is not None
    assert (creds.access_key, creds.secret_key) == ("AKGIVEN", "given-secret")
    assert creds.postgres_password == first.postgres_password
    assert json.loads(path.read_text())["access_key"] == "AKGIVEN"


def test_env_lines_evaluate_in_a_shell(tmp_path: Path) -> None:
    keys = {"s3_port": 9100, "mlflow_port": 9200, "prefect_port": 9300, "secret_key": "it's $ecret"}
    stack.Stack(config(tmp_path, **keys)).credentials(create=True)
    result = runner.invoke(stack_app, ["env", *cli_args(tmp_path, **keys)])
    assert result.exit_code == 0, result.output
    shell = subprocess.run(
        ["bash", "-c", f"eval {shlex.quote(result.stdout)}; env"], capture_output=True, text=True, check=True
    )
    variables = dict(line.split("=", 1) for line in shell.stdout.splitlines() if "=" in line)
    assert variables["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9100"
    assert variables["AWS_SECRET_ACCESS_KEY"] == "it's $ecret"
    assert variables["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9200"
    assert variables["PREFECT_API_URL"] == "http://127.0.0.1:9300/api"
    assert "MLFLOW_S3_ENDPOINT_URL" not in result.stdout  # clients reach artifacts through MLflow


def _dump(cfg: PipelineConfig) -> dict[str, object]:
    return cfg.model_dump(exclude={"profile"})


def test_stack_profile_is_the_overrides_for_default_ports() -> None:
    default = load_config(PARAMS)
    assert _dump(load_config(PARAMS, "stack")) == _dump(
        load_config(PARAMS, "default", stack.stack_overrides(default))
    )


def test_overrides_follow_ports_and_bucket(tmp_path: Path) -> None:
    cfg = config(tmp_path, host="0.0.0.0", s3_port=9100, mlflow_port=9200, bucket="team")
    overrides = dict(o.split("=", 1) for o in stack.stack_overrides(cfg))
    assert overrides["tracking.tracking_uri"] == "http://127.0.0.1:9200"  # clients use loopback
    assert overrides["data.dvc.endpoint_url"] == "http://127.0.0.1:9100"
    assert overrides["ray.storage_path"] == "s3://team/ray"
    pointed = load_config(PARAMS, "default", stack.stack_overrides(cfg))
    assert pointed.orchestration.results == "s3://team/prefect-results"
    # What `up` prints: the `stack` profile for the default ports, else these overrides.
    assert _usage(stack.Stack(config(tmp_path))).endswith("ssl-pipeline run --profile stack")
    assert "--set tracking.tracking_uri=http://127.0.0.1:9200 " in _usage(stack.Stack(cfg))


def test_bad_stack_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stack\.backend"):
        config(tmp_path, backend="mysql")
    with pytest.raises(ConfigError, match=r"stack\.mlflow_port"):
        config(tmp_path, mlflow_port=70000)
    with pytest.raises(stack.StackError, match=r"stack\.s3_port"):
        stack.Stack(config(tmp_path, s3_port=60000)).weed_ports()
    result = runner.invoke(stack_app, ["status", "--config", str(PARAMS), "--set", "stack.prefect_port=0"])
    assert result.exit_code == 2 and "stack.prefect_port" in result.stderr


def _free_base_port(width: int = len(stack.WEED_SERVERS)) -> int:
    """A port p with p .. p+width-1 and each + 10000 free (weed's ports), below the ephemeral range."""
    for base in random.sample(range(20000, 32768 - stack.GRPC_OFFSET - width), 300):
        ports = [base + i + offset for i in range(width) for offset in (0, stack.GRPC_OFFSET)]
        if all(stack._port_free("127.0.0.1", p) for p in ports):
            return base
    raise RuntimeError("no free ports")


def test_a_taken_port_stops_up_before_anything_starts(tmp_path: Path) -> None:
    s3_port = _free_base_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        s = stack.Stack(config(tmp_path, s3_port=s3_port, prefect_port=port))
        with pytest.raises(stack.StackError, match=rf"port {port} .* stack\.prefect_port"):
            s.up()
    assert not (tmp_path / "pids").exists()


def test_status_of_a_stopped_stack_and_a_stale_pid_file(tmp_path: Path) -> None:
    s = stack.Stack(config(tmp_path, backend="sqlite"))
    s.pid_file("mlflow").parent.mkdir(parents=True)
    s.pid_file("mlflow").write_text(f"{os.getpid()}\n")  # a live process, but not an MLflow server here
    assert [(x.name, x.pid, x.healthy) for x in s.status()] == [
        ("s3", None, False),
        ("mlflow", None, False),
        ("prefect", None, False),
    ]
    assert not s.pid_file("mlflow").exists()
    result = runner.invoke(stack_app, ["status", "--json", *cli_args(tmp_path, backend="sqlite")])
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["s3", "mlflow", "prefect"]
    assert rows[1]["log"] == str(tmp_path / "logs" / "mlflow.log")
    down = runner.invoke(stack_app, ["down", *cli_args(tmp_path)])
    assert down.exit_code == 0 and "nothing was running" in down.stdout


def test_a_failing_server_stops_what_up_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 comes up (a stand-in process), MLflow exits at once: up names it and its log, stops S3."""
    commands = {"s3": ["sleep", "120"], "mlflow": ["sh", "-c", "echo cannot open the store; exit 3"]}
    monkeypatch.setattr(stack.Stack, "_check_can_start", lambda self, name: None)
    monkeypatch.setattr(stack.Stack, "_command", lambda self, name, creds: (commands[name], {}))
    monkeypatch.setattr(stack.Stack, "healthy", lambda self, name: name == "s3")
    monkeypatch.setattr(stack.Stack, "_prepare", lambda self, name, creds: None)
    base = _free_base_port()
    keys = {"backend": "sqlite", "s3_port": base, "mlflow_port": base + 5, "prefect_port": base + 6}
    result = runner.invoke(stack_app, ["up", *cli_args(tmp_path, **keys)])
    assert result.exit_code == 1
    log = tmp_path / "logs" / "mlflow.log"
    assert f"error: MLflow server exited with code 3 while starting; see {log}" in result.stderr
    assert "cannot open the store" in result.stderr  # the log's tail
    assert not list((tmp_path / "pids").iterdir())
    assert _leftovers(tmp_path) == []


def test_the_exit_code_is_read_even_when_the_child_is_not_reaped_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of the CI run on 90139f6: ``_alive`` saw MLflow gone before ``poll`` reaped it, and
    the error lost its exit code. Here ``_alive`` says gone while the child still runs."""
    monkeypatch.setattr(
        stack.Stack, "_command", lambda self, name, creds: (["sh", "-c", "sleep 0.5; exit 3"], {})
    )
    monkeypatch.setattr(stack.Stack, "healthy", lambda self, name: False)
    monkeypatch.setattr(stack, "_alive", lambda pid, workdir: False)
    s = stack.Stack(config(tmp_path, backend="sqlite"))
    pid = s._start("mlflow", stack.Credentials("a", "b", "c"))
    with pytest.raises(stack.StackError, match="MLflow server exited with code 3 while starting"):
        s._wait_healthy("mlflow", pid)
    assert stack._exit_code(pid) == 3


# The container files: docker is not on this machine, so they are checked by parsing.


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _host_port(service: dict) -> tuple[str, int, int]:
    (mapping,) = service["ports"]
    host, published, target = mapping.split(":")
    return host, int(published), int(target)


def test_compose_services_match_the_stack_defaults() -> None:
    services = _compose()["services"]
    assert set(services) == {"seaweedfs", "postgres", "mlflow", "prefect", "pipeline"}
    defaults = StackConfig()
    expected = {
        "seaweedfs": defaults.s3_port,
        "postgres": defaults.postgres_port,
        "mlflow": defaults.mlflow_port,
        "prefect": defaults.prefect_port,
    }
    for name, port in expected.items():
        host, published, _ = _host_port(services[name])
        assert (host, published) == ("127.0.0.1", port), name
    assert _host_port(services["postgres"])[2] == 5432
    assert f"-bucket={defaults.bucket}" in services["seaweedfs"]["command"][0]
    assert f"--artifacts-destination=s3://{defaults.bucket}/mlflow" in services["mlflow"]["command"]
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", f"{name} has no healthcheck"
    # The pipeline container gets the `stack` profile's overrides with the servers' names for loopback.
    in_compose = stack.stack_overrides(load_config(PARAMS))
    in_compose = [o.replace("127.0.0.1:8333", "seaweedfs:8333") for o in in_compose if "tracking" not in o]
    assert [a.removeprefix("--set=") for a in services["pipeline"]["command"][1:]] == in_compose
    assert services["pipeline"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_compose_commits_no_secret() -> None:
    text = COMPOSE.read_text()
    for name, service in _compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            if re.search("KEY|SECRET|PASSWORD", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}: {key} is a literal"
    assert "infra/.env" in text


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    lines = [
        line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    return [(line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1]) for line in lines]


def test_dockerfile_parses_and_installs_from_the_lock() -> None:
    instructions = _instructions(DOCKERFILE.read_text())
    known = {"FROM", "RUN", "COPY", "ENV", "ARG", "WORKDIR", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert {keyword for keyword, _ in instructions} <= known
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("python:3.11-slim")
    targets = {args.split()[-1] for keyword, args in instructions if keyword == "FROM"}
    compose_targets = {s["build"]["target"] for s in _compose()["services"].values() if "build" in s}
    assert compose_targets <= targets
    installs = [args for keyword, args in instructions if keyword == "RUN" and "pip install" in args]
    assert installs and all("-c constraints.txt" in args for args in installs if "--upgrade" not in args)
    assert ("ENTRYPOINT", '["ssl-pipeline"]') in instructions
    for keyword, args in instructions:
        if keyword == "COPY":
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), source
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(KEY|SECRET|PASSWORD)\w*=", args), args


# A real stack: two ups and two downs on free ports, PostgreSQL here (backend auto).


def _leftovers(folder: Path) -> list[int]:
    """Processes whose working folder is inside the stack folder."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_up_status_down_up_keeps_the_data() -> None:
    from mlflow import MlflowClient

    # Not pytest's tmp_path: as root PostgreSQL runs as `nobody`, who must be able to enter the folder.
    folder = Path(tempfile.mkdtemp(prefix="ssl-stack-"))
    folder.chmod(0o755)
    base = _free_base_port()
    others = [base + len(stack.WEED_SERVERS) + i for i in range(3)]
    assert all(stack._port_free("127.0.0.1", p) for p in others)
    keys = {"s3_port": base, "mlflow_port": others[0], "prefect_port": others[1], "postgres_port": others[2]}
    args = cli_args(folder / "stack", **keys)
    cfg = config(folder / "stack", **keys)
    s = stack.Stack(cfg)

    def cli(*command: str) -> str:
        result = runner.invoke(stack_app, [*command, *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    try:
        assert "The stack is up" in cli("up")
        statuses = stack.status(cfg)
        assert all(x.healthy for x in statuses) and len(statuses) == len(s.services)
        pids = [x.pid for x in statuses]
        assert json.loads(cli("status", "--json"))[0]["healthy"] is True

        creds = s.credentials()
        assert creds is not None
        s3 = s.s3_client(creds)
        s3.put_object(Bucket=cfg.stack.bucket, Key="probe.txt", Body=b"kept")
        client = MlflowClient(s.url("mlflow"))
        experiment = client.create_experiment("stack-probe")
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "artifact through the proxy", "note.txt")
        keys_in_s3 = [
            o["Key"] for o in s3.list_objects_v2(Bucket=cfg.stack.bucket, Prefix="mlflow/")["Contents"]
        ]
        assert any(k.endswith("/note.txt") for k in keys_in_s3)
        with urllib.request.urlopen(f"{s.url('prefect')}/api/health", timeout=5) as health:
            assert json.load(health) is True

        assert "already up" in cli("up")

        assert "Stopped: Prefect server, MLflow server" in cli("down")
        assert not any(x.healthy or x.pid for x in stack.status(cfg))
        assert not any(stack._running(pid) for pid in pids if pid)
        assert _leftovers(folder) == []

        cli("up")
        assert client.get_experiment_by_name("stack-probe").experiment_id == experiment
        assert client.download_artifacts(run.info.run_id, "note.txt", str(folder))
        assert s3.get_object(Bucket=cfg.stack.bucket, Key="probe.txt")["Body"].read() == b"kept"

        assert "Deleted" in cli("down", "--purge")
        assert not (folder / "stack").exists() and _leftovers(folder) == []
    finally:
        stack.down(cfg)
        shutil.rmtree(folder, ignore_errors=True)
