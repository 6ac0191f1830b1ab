"""dvc.yaml's stages run the pipeline's task functions, and `dvc repro` reruns only what is stale."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.config import PipelineConfig
from tests.conftest import REPO

BIN = Path(sys.executable).parent


def test_dvc_yaml_stages_name_real_params_and_commands() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert list(stages) == ["prepare", "pretrain", "sweep"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"ssl-pipeline stage {name}"
        for key in stage["params"]:
            assert key in params, f"{name}: params.yaml has no {key}"
            assert key == "profiles" or key in PipelineConfig.model_fields
        for dep in stage["deps"]:
            assert dep.startswith("workspace/") or (REPO / dep).exists(), dep


def dvc(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "SSL_PIPELINE_PROFILE": "smoke"}
    out = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_dvc_repro_runs_the_stages_and_then_only_what_changed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    # The smoke profile with one pretraining epoch and two sweep cells (kNN and the linear probe on
    # every label, one seed): the stages, not the sweep's grid, are what this test is about.
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    smoke = params["profiles"]["smoke"]
    smoke["pretrain"]["epochs"] = 1
    smoke["evaluate"].update(
        label_fractions=[1.0], finetune_fractions=[], primary_protocol="linear", seeds=[0]
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for package in ("ssl_models", "tasks"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    dvc("init", "--no-scm", "-q", cwd=repo)

    first = dvc("repro", cwd=repo)
    for stage in ("prepare", "pretrain", "sweep"):
        assert f"Running stage '{stage}'" in first
    metrics = yaml.safe_load((repo / "workspace" / "stages" / "sweep.json").read_text())
    assert 0.1 < metrics["linear_top1_100pct"] <= 1.0

    assert "Running stage" not in dvc("repro", cwd=repo)

    params["evaluate"]["knn"]["temperature"] = 0.05
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc("repro", cwd=repo)
    assert "Running stage 'sweep'" in third
    assert "Running stage 'pretrain'" not in third and "Running stage 'prepare'" not in third
