"""The peer benchmarks (bench/peers.py, bench/lightly_peer.py, bench/overhead.py,
bench/profile_epoch.py) on the smoke subset of the real Fashion-MNIST: what they measure and
write, not the figures (those are bench/results/, measured on the full data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms.functional import to_tensor

from bench import overhead, peers, profile_epoch
from bench.lightly_peer import ImageDataset, lightly_loader, lightly_model, lightly_transform
from ssl_models.augment import AugmentParams
from tasks.config import load_config
from tasks.pretrain import build_encoder, save_encoder
from tests.conftest import REPO

SMOKE = ["--profile", "smoke"]
# 1% of the smoke subset is one label a class: too few to hold a fifth out, so the benches' 1% cells
# pick their configs on the smoke profile's validation split here.
ONE_PCT_ON_SMOKE = ["--set", "evaluate.selection=validation"]


def smoke_sets(workspace: Path) -> list[str]:
    return ["--set", f"workspace={workspace}", "--set", f"data.dvc.root={workspace / 'dvc-repo'}"]


def test_lightly_views_with_no_augmentation_are_the_image() -> None:
    """Our strengths map onto LightlySSL's arguments: all off, its two views are the image itself."""
    off = AugmentParams(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0)
    image = (torch.arange(28 * 28) % 251).to(torch.uint8).view(1, 1, 28, 28)
    views = ImageDataset(image, lightly_transform("simclr", off, 28))[0]
    assert len(views) == 2
    for view in views:
        assert torch.allclose(view, to_tensor(image[0, 0].numpy()), atol=1 / 255)
    # BYOL's views blur (and solarize) by design (table 6), as ours do: two views, the image's size
    assert [tuple(v.shape) for v in ImageDataset(image, lightly_transform("byol", off, 28))[0]] == [
        (1, 28, 28)
    ] * 2
    strong = lightly_transform("simclr", AugmentParams(), 28)
    assert not torch.equal(*ImageDataset(image, strong)[0])


def test_the_lightly_encoder_is_ours_and_loads_into_the_evaluation(tmp_path: Path) -> None:
    """Same backbone, same initialisation; what it learns loads into the evaluation's encoder."""
    for method in ("simclr", "byol"):
        cfg = load_config(REPO / "params.yaml", "smoke", [f"pretrain.method={method}"])
        ours, theirs = build_encoder(cfg, 0.3, 0.35), peers.theirs(cfg, _Data())
        assert all(torch.equal(theirs.backbone.state_dict()[k], v) for k, v in ours.state_dict().items())
        with torch.no_grad():
            next(theirs.backbone.parameters()).add_(1.0)  # "trained"
        loaded = build_encoder(cfg, 0.3, 0.35)
        loaded.load_state_dict(
            torch.load(save_encoder({"model": theirs.state_dict()}, tmp_path / f"{method}.pt"))
        )
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in theirs.backbone.state_dict().items())
    with pytest.raises(ValueError, match="no LightlySSL peer for method 'dino'"):
        lightly_model("dino", ours, ours.num_features, {})


class _Data:
    mean, std = 0.3, 0.35


def test_lightly_loader_batches_views_in_workers() -> None:
    images = (torch.rand(40, 1, 28, 28) * 255).to(torch.uint8)
    loader = lightly_loader(images, lightly_transform("simclr", AugmentParams(), 28), 16, 1, 0)
    batches = list(loader)
    assert len(batches) == 2  # full batches only
    assert [tuple(v.shape) for v in batches[0]] == [(16, 1, 28, 28)] * 2
    assert all(v.min() >= 0 and v.max() <= 1 for v in batches[0])


def test_peers_bench_on_the_smoke_subset(tmp_path: Path) -> None:
    """Both frameworks trained and evaluated by the same code; the summary is computed from the rows."""
    out = tmp_path / "peers.json"
    args = [*SMOKE, "--epochs", "1", "--methods", "simclr", "--workers", "0", "--seeds", "0", "1"]
    args += ["--throughput-steps", "2"]
    args += [
        "--warmup-steps",
        "1",
        "--set",
        "pretrain.batch_size=64",
        *ONE_PCT_ON_SMOKE,
        *smoke_sets(tmp_path),
        "--out",
        str(out),
    ]
    report = peers.main(args)
    assert json.loads(out.read_text()) == report
    assert report["peer"] == "lightly 1.6.0"
    assert [(r["framework"], r["method"]) for r in report["quality"]] == [
        ("ssl-pipeline", "simclr"),
        ("lightly", "simclr"),
    ]
    for row in report["throughput"]:
        assert row["ratio"] == pytest.approx(row["ours"] / row["lightly"], rel=0.02)  # of rounded figures
        assert row["lightly"] == max(row["lightly_by_workers"].values())
    cells = ("knn_1pct", "knn_10pct", "linear_1pct", "linear_10pct")
    for row in report["quality"]:
        assert all(10 < row[c]["mean"] <= 100 for c in cells)  # well above chance (10 classes)
        assert row["linear_1pct"]["n"] == 2 and row["knn_1pct"]["n"] == 1
    scratch = report["supervised_from_scratch"]["supervised_1pct"]["mean"]
    for method, entry in report["summary"].items():
        ours, theirs = (
            next(r for r in report["quality"] if r["framework"] == f and r["method"] == method)
            for f in ("ssl-pipeline", "lightly")
        )
        diff = ours["linear_1pct"]["mean"] - theirs["linear_1pct"]["mean"]
        assert entry["linear_1pct_over_lightly"] == pytest.approx(diff, abs=0.01)
        assert entry["linear_1pct_over_lightly_met"] == (diff >= 2.0)
        assert entry["linear_1pct_over_scratch"] == pytest.approx(
            ours["linear_1pct"]["mean"] - scratch, abs=0.01
        )


def test_peak_memory_counts_the_largest_process_and_the_whole_tree(tmp_path: Path) -> None:
    """A child holding 150 MB and its own child holding 100 MB: both peaks are seen, by RSS and PSS."""
    hold = "import sys, time; x = bytearray({} * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(3.5)"
    script = (
        "import subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, '-c', {hold.format(100)!r}]); "
        f"exec({hold.format(150)!r}); p.wait()"
    )
    measured = overhead.measure([sys.executable, "-c", script], tmp_path / "log.txt")
    assert measured.returncode == 0
    assert 150 <= measured.peak_process_rss_mb < 220
    assert measured.peak_tree_rss_mb >= measured.peak_process_rss_mb + 100
    # Both bytearrays are private pages: the PSS sees all of them, and never more than the RSS.
    assert 250 <= measured.peak_tree_pss_mb <= measured.peak_tree_rss_mb
    assert measured.seconds >= 3.5 and measured.samples >= 3  # sampled once a second


def test_a_failing_step_of_the_overhead_bench_names_it_and_its_log(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.overhead",
            *SMOKE,
            "--workspace",
            str(tmp_path / "ws"),
            "--set",
            "data.source=folder",
            "--out",
            str(tmp_path / "o.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "data_step failed" in result.stderr and "data_step.log" in result.stderr
    assert not (tmp_path / "o.json").exists()


def test_profile_splits_the_step_into_the_loops_phases(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    change = "pretrain.channels_last=false"
    args = [*SMOKE, "--steps", "3", "--warmup", "1", "--compare", change, *smoke_sets(tmp_path)]
    report = profile_epoch.main([*args, "--out", str(out)])
    compared = report["compared"][change]
    ms = compared["ms_per_step"]
    assert compared["ratio"] == pytest.approx(ms[change] / ms["as_is"], rel=0.01)
    assert sum(report["phases_pct"].values()) == pytest.approx(100, abs=0.5)
    assert report["phases_pct"]["forward"] > 0 and report["phases_pct"]["backward"] > 0
    ops = [row["op"] for row in report["top_ops_self_cpu"]]
    assert any("conv" in op for op in ops)
    assert any(row["op"] == "aten::grid_sampler_2d" for row in report["top_ops_by_phase"]["views"])
    assert json.loads(out.read_text())["steps"] == 3


def test_the_cli_runs_a_benchmark_by_name_with_its_own_options() -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    unknown = CliRunner().invoke(app, ["bench", "nope"])
    assert unknown.exit_code == 2 and "no benchmark 'nope'" in unknown.output and "peers" in unknown.output
    passed_on = subprocess.run(
        [sys.executable, "-m", "flows.cli", "bench", "peers", "--epochs", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert passed_on.returncode == 2 and "argument --epochs: invalid int value: 'x'" in passed_on.stderr
