"""The Ray deployment manifests in infra/ray/ are valid for their launchers and run this code.

``cluster.yaml`` passes the cluster launcher's own JSON schema and the checks ``ray up`` makes
before it calls AWS, with a CPU head and an autoscaling GPU worker type; ``rayjob.yaml`` is a
RayJob (its structure: KubeRay's CRD schema is not at hand) with a CPU head group and enough
GPU workers for its entrypoint. Both run the image the code names and reach S3 by role, not
by keys; the entrypoint is the project's ``pretrain`` command, with options its CLI parses and
``--set`` keys its config loader accepts. No network, no Ray cluster.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import ray.autoscaler
import typer.main
import yaml

import tasks.pretrain
from tasks.config import load_config
from tests.conftest import REPO

INFRA = REPO / "infra" / "ray"
CLUSTER_YAML = INFRA / "cluster.yaml"
RAYJOB_YAML = INFRA / "rayjob.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def _cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _rayjob() -> dict[str, Any]:
    return yaml.safe_load(RAYJOB_YAML.read_text())


def _pod_specs(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def _gpus(container: dict[str, Any]) -> int:
    resources = container.get("resources", {})
    return int(resources.get("limits", {}).get("nvidia.com/gpu", 0))


def _entrypoint_args() -> tuple[str, list[str]]:
    """The entrypoint's ``--profile`` and its ``--set`` assignments, in order."""
    words = shlex.split(_rayjob()["spec"]["entrypoint"])
    args = words[len(shlex.split(tasks.pretrain.ENTRYPOINT)) :]
    options = list(zip(args[::2], args[1::2], strict=True))
    assert {name for name, _ in options} <= {"--profile", "--set"}, args
    profiles = [value for name, value in options if name == "--profile"]
    return (profiles[-1] if profiles else "default"), [value for name, value in options if name == "--set"]


def test_cluster_yaml_passes_the_cluster_launcher_schema() -> None:
    schema = json.loads(RAY_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
        for e in validator.iter_errors(_cluster())
    ]
    assert not errors, "\n".join(errors)


def test_cluster_yaml_passes_ray_up_checks_and_keeps_no_default_setup() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_cluster()))
    validate_config(prepared)
    for key in ("initialization_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[key] == [], key


def test_cluster_head_has_no_gpu_and_gpu_workers_autoscale() -> None:
    cluster = _cluster()
    node_types = cluster["available_node_types"]
    head = node_types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0
    workers = {name: t for name, t in node_types.items() if name != cluster["head_node_type"]}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, workers
    for worker in gpu_workers.values():
        assert worker.get("min_workers", 0) < worker["max_workers"] <= cluster["max_workers"]
        assert "--gpus all" in worker["docker"]["worker_run_options"]
    docker = cluster["docker"]
    assert "--gpus all" not in [*docker.get("run_options", []), *docker.get("head_run_options", [])]


def test_cluster_nodes_reach_s3_by_instance_profile() -> None:
    cluster = _cluster()
    assert "aws_credentials" not in cluster["provider"]
    for name, node_type in cluster["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"]["Name"].startswith("ssl-pipeline-ray"), name


def test_rayjob_is_a_ray_io_v1_job_with_cpu_head_and_gpu_workers() -> None:
    job = _rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    cluster = job["spec"]["rayClusterSpec"]
    head_containers = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert all(_gpus(c) == 0 for c in head_containers)
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    assert [_gpus(c) for c in workers["template"]["spec"]["containers"]] == [1]


def test_rayjob_workers_give_every_ray_train_worker_a_gpu() -> None:
    profile, overrides = _entrypoint_args()
    cfg = load_config(REPO / "params.yaml", profile=profile, overrides=overrides)
    (workers,) = _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(_gpus(c) for c in workers["template"]["spec"]["containers"])
    assert cfg.ray.use_gpu
    assert workers["minReplicas"] * gpus >= cfg.ray.num_workers


def test_rayjob_pods_reach_s3_by_service_account_and_turn_telemetry_off() -> None:
    for pod in _pod_specs(_rayjob()):
        assert pod["serviceAccountName"] == "ssl-pipeline"
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"
            assert not [name for name in env if name.startswith("AWS_")], container["name"]
            assert not [e for e in env.values() if "valueFrom" in e], container["name"]
    assert "--env RAY_USAGE_STATS_ENABLED=0" in _cluster()["docker"]["run_options"]


def test_manifests_hold_no_credentials_or_account_ids() -> None:
    for path in (CLUSTER_YAML, RAYJOB_YAML):
        text = path.read_text()
        assert not re.search(r"aws_(access_key_id|secret_access_key|session_token)", text, re.IGNORECASE), (
            path
        )
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), path
        assert not re.search(r"\b\d{12}\b", text), path


def test_both_manifests_run_the_image_the_code_names() -> None:
    docker = _cluster()["docker"]
    cluster_images = {docker[key] for key in ("image", "head_image", "worker_image") if key in docker}
    job_images = {c["image"] for pod in _pod_specs(_rayjob()) for c in pod["containers"]}
    assert cluster_images == job_images == {tasks.pretrain.CLUSTER_IMAGE}


def test_entrypoint_is_a_console_script_of_the_project() -> None:
    entrypoint = _rayjob()["spec"]["entrypoint"]
    assert entrypoint.startswith(tasks.pretrain.ENTRYPOINT + " ")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert shlex.split(entrypoint)[0] in scripts


def test_entrypoint_parses_as_the_cli_pretrain_command() -> None:
    from flows.cli import app

    words = shlex.split(_rayjob()["spec"]["entrypoint"])
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert words[1] in commands, sorted(commands)
    commands[words[1]].make_context(words[1], words[2:])


def test_entrypoint_overrides_are_accepted_and_land() -> None:
    profile, overrides = _entrypoint_args()
    assert profile == "full"
    cfg = load_config(REPO / "params.yaml", profile=profile, overrides=overrides)
    assert cfg.ray.num_workers == 4
    assert cfg.ray.use_gpu is True
    assert cfg.ray.storage_path is not None and cfg.ray.storage_path.startswith("s3://")
    for assignment in overrides:
        key, _, raw = assignment.partition("=")
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == yaml.safe_load(raw), assignment
