from dataclasses import replace
from pathlib import Path

import pytest

from tasks.config import ConfigError, load_config
from tests.conftest import REPO

PARAMS = REPO / "params.yaml"


@pytest.mark.parametrize("profile", ["default", "smoke", "full", "stack"])
def test_every_profile_of_params_yaml_is_valid(profile: str) -> None:
    cfg = load_config(PARAMS, profile)
    assert cfg.profile == profile


def test_profile_changes_only_its_keys() -> None:
    default, smoke = load_config(PARAMS), load_config(PARAMS, "smoke")
    assert smoke.pretrain.epochs < default.pretrain.epochs
    assert smoke.pretrain.lr == default.pretrain.lr
    assert smoke.evaluate.finetune.lr == default.evaluate.finetune.lr


def test_override_sets_nested_key_with_yaml_typing() -> None:
    cfg = load_config(
        PARAMS,
        "smoke",
        ["pretrain.epochs=7", "augment.crop_scale=[0.3, 0.9]", "pretrain.method_params={temperature: 0.2}"],
    )
    assert cfg.pretrain.epochs == 7
    assert cfg.augment.crop_scale == (0.3, 0.9)
    assert cfg.pretrain.method_params == {"temperature": 0.2}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("pretrain.lrr=0.1", "pretrain.lrr"),
        ("pretrain.lr=-1", "pretrain.lr"),
        ("pretrain.epochs=ten", "pretrain.epochs"),
        ("evaluate.label_fractions=[0.01, 1.5]", "evaluate.label_fractions.1"),
        ("augment.crop_scale=[0.9, 0.2]", "augment.crop_scale"),
        ("model.backbone=vgg_tiny_cnn", "model.backbone"),  # in neither ours nor timm
        ("pretrain.method=swav", "pretrain.method"),
        ("pretrain.method=mae", "model.backbone"),
        ("pretrain.method_params={tau: 0.1}", "pretrain.method_params"),
        ("pretrain.method_params={temperature: warm}", "pretrain.method_params.temperature"),
        ("pretrain.precision=fp16", "pretrain.precision"),
        ("pretrain.compile=maybe", "pretrain.compile"),
        ("data.source=folder", "data"),
        ("seed.x=1", "--set seed.x"),
    ],
)
def test_bad_value_fails_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(PARAMS, overrides=[override])
    assert f"{named}:" in str(info.value)


def test_unknown_profile_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        load_config(PARAMS, "huge")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("pretrain:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml \(profile default\): pretrain.epocs: Extra inputs"):
        load_config(path)


def test_digest_changes_with_the_sections_it_covers() -> None:
    a = load_config(PARAMS, "smoke")
    b = load_config(PARAMS, "smoke", ["evaluate.knn.k=5"])
    assert a.digest("pretrain") == b.digest("pretrain")
    assert a.digest() != b.digest()


def test_sections_become_the_loop_settings() -> None:
    cfg = load_config(PARAMS, overrides=["pretrain.epochs=3", "pretrain.warmup_epochs=0.5"])
    pretrain = cfg.pretrain.settings(seed=7)
    assert (pretrain.epochs, pretrain.warmup_epochs, pretrain.seed, pretrain.lr) == (
        3,
        0.5,
        7,
        cfg.pretrain.lr,
    )
    finetune = cfg.evaluate.finetune.settings(seed=1)
    assert (finetune.lr, finetune.batch_size) == (cfg.evaluate.finetune.lr, cfg.evaluate.finetune.batch_size)


def test_full_profile_trains_in_bf16_and_the_default_as_before() -> None:
    full = load_config(PARAMS, "full").pretrain.settings(seed=0)
    default = load_config(PARAMS).pretrain.settings(seed=0)
    # compile stays off in `full`: torch.compile needs a C compiler the pipeline image lacks
    assert (full.precision, full.compile, default.precision, default.compile) == (
        "bf16",
        False,
        "fp32",
        False,
    )
    cpu_run = load_config(PARAMS, "full", ["pretrain.precision=fp32", "pretrain.compile=false"])
    assert cpu_run.pretrain.settings(seed=0) == replace(full, precision="fp32", compile=False)


def test_search_grid_names_a_bad_key_or_value_and_puts_the_base_config_first() -> None:
    with pytest.raises(
        ConfigError, match=r"evaluate.search.linear.momentum: not a linear setting; choose from"
    ):
        load_config(PARAMS, overrides=["evaluate.search.linear.momentum=[0.9]"])
    with pytest.raises(ConfigError, match=r"evaluate.search.finetune.lr: .*greater than 0 \(got -0.1\)"):
        load_config(PARAMS, overrides=["evaluate.search.finetune.lr=[0.001, -0.1]"])
    with pytest.raises(ConfigError, match=r"evaluate.asha.grace_period: at most reports \(4\), got 5"):
        load_config(PARAMS, overrides=["evaluate.asha.grace_period=5"])
    cfg = load_config(PARAMS, overrides=["evaluate.search.linear={lr: [0.1, 0.01], steps: [10, 500]}"])
    grid = cfg.evaluate.grid("linear")
    assert len(grid) == 4 and (grid[0]["lr"], grid[0]["steps"]) == (
        cfg.evaluate.linear.lr,
        cfg.evaluate.linear.steps,
    )
    assert {(p["lr"], p["steps"]) for p in grid} == {(0.1, 10), (0.1, 500), (0.01, 10), (0.01, 500)}
    assert cfg.evaluate.grid("supervised") == cfg.evaluate.grid("finetune")
