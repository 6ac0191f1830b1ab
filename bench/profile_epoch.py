"""Where a pretraining step of the default profile spends its time: torch.profiler over steps of
the ``ssl_models`` loop on the real Fashion-MNIST images, split into the loop's phases.

The steps are the loop's own (``ssl_models.train.pretrain`` does the same calls in the same
order): draw the batch, build the two views on the batch (``method.make_views``), forward and
loss, backward, optimiser and schedule. Each phase is a ``record_function`` range; the table
lists the phases' share of the wall time and the operators with the most self CPU time.

    .venv/bin/python -m bench.profile_epoch [--steps 40] [--warmup 5] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ssl_models import create_method
from ssl_models.augment import to_float
from ssl_models.train import build_optimizer, step_generator, total_steps, warmup_cosine
from tasks.config import PipelineConfig, load_config
from tasks.data import PreparedData, ingest_and_prepare
from tasks.pretrain import build_encoder
from tasks.streaming import read_images

RESULTS = Path(__file__).parent / "results" / "profile_epoch.json"
PHASES = ("batch", "views", "forward", "backward", "optimizer")


def training_step(cfg: PipelineConfig, data: PreparedData, images: torch.Tensor) -> Callable[[int], None]:
    """Step ``i`` of the loop of ``ssl_models.train.pretrain``, its phases as profiler ranges."""
    method = create_method(
        cfg.pretrain.method, build_encoder(cfg, data.mean, data.std), cfg.pretrain.method_params
    )
    settings, aug = cfg.pretrain.settings(cfg.seed), cfg.augment.params()
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    method.to(memory_format=memory_format).train()
    optimizer = build_optimizer(method, settings)
    n, batch = len(images), settings.batch_size
    steps_per_epoch, total = n // batch, total_steps(n, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, round(settings.warmup_epochs * steps_per_epoch))
    )
    order = torch.randperm(n, generator=step_generator(settings.seed, -1))

    def step(i: int) -> None:
        with record_function("batch"):
            j = i % steps_per_epoch
            x = to_float(images[order[j * batch : (j + 1) * batch]])
        with record_function("views"):
            views = method.make_views(x, aug, step_generator(settings.seed, i))
            views = [v.contiguous(memory_format=memory_format) for v in views]
        with record_function("forward"):
            loss = method(views)
        with record_function("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            scheduler.step()
            method.on_step_end(i / total)
        loss.item()

    return step


def compare(
    cfg: PipelineConfig,
    overrides: list[str],
    data: PreparedData,
    images: torch.Tensor,
    change: str,
    steps: int,
    rounds: int,
) -> dict[str, Any]:
    """ms/step of the config as it is and with ``change`` (KEY=VALUE), interleaved in rounds."""
    changed = load_config("params.yaml", cfg.profile, [*overrides, change])
    loops = {"as_is": training_step(cfg, data, images), change: training_step(changed, data, images)}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(rounds + 1):
        for name, step in loops.items():
            start = time.perf_counter()
            for i in range(r * steps, (r + 1) * steps):
                step(i)
            if r:  # round 0 warms up
                times[name].append(1000 * (time.perf_counter() - start) / steps)
    ms = {name: round(statistics.median(t), 1) for name, t in times.items()}
    return {"ms_per_step": ms, "ratio": round(ms[change] / ms["as_is"], 3), "rounds": rounds, "steps": steps}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also time the loop with this change against it as it is, side by side",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    cfg = load_config("params.yaml", args.profile, args.overrides)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data = ingest_and_prepare(cfg)
    images = read_images(cfg, data.unlabeled).images
    step = training_step(cfg, data, images)
    settings, batch = cfg.pretrain.settings(cfg.seed), cfg.pretrain.batch_size

    for i in range(args.warmup):
        step(i)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.warmup, args.warmup + args.steps):
            step(i)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    phase_us = {e.key: e.cpu_time_total for e in events if e.key in PHASES}
    total_us = sum(phase_us.values())
    ops = sorted(
        (e for e in events if e.key not in PHASES and not e.key.startswith("ProfilerStep")),
        key=lambda e: -e.self_cpu_time_total,
    )
    by_phase = _ops_by_phase(prof, args.top)
    report = {
        "command": "python -m bench.profile_epoch " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "config": {
            "profile": cfg.profile,
            "method": cfg.pretrain.method,
            "backbone": cfg.model.backbone,
            "batch_size": batch,
            "channels_last": settings.channels_last,
        },
        "steps": args.steps,
        "ms_per_step": round(1000 * wall / args.steps, 1),
        "images_per_s_profiled": round(args.steps * batch / wall),
        "phases_pct": {k: round(100 * phase_us.get(k, 0) / total_us, 1) for k in PHASES},
        "phases_ms_per_step": {k: round(phase_us.get(k, 0) / 1000 / args.steps, 1) for k in PHASES},
        "top_ops_self_cpu": [
            {
                "op": e.key,
                "self_ms_per_step": round(e.self_cpu_time_total / 1000 / args.steps, 2),
                "pct": round(100 * e.self_cpu_time_total / total_us, 1),
                "calls_per_step": round(e.count / args.steps, 1),
            }
            for e in ops[: args.top]
        ],
        "top_ops_by_phase": by_phase,
        "compared": {
            change: compare(cfg, args.overrides, data, images, change, 5, 4) for change in args.compare
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps({k: report[k] for k in ("ms_per_step", "images_per_s_profiled", "phases_pct")}, indent=2)
    )
    for row in report["top_ops_self_cpu"]:
        print(f"{row['pct']:5.1f}%  {row['self_ms_per_step']:7.2f} ms  {row['op']}")
    return report


def _ops_by_phase(prof: profile, top: int) -> dict[str, list[dict[str, Any]]]:
    """Self CPU time of the operators inside each phase's range (the profiler's event tree)."""
    totals: dict[str, dict[str, float]] = {p: defaultdict(float) for p in PHASES}

    def walk(event: Any, phase: str | None) -> None:
        if event.name in PHASES:
            phase = event.name
        elif phase is not None:
            totals[phase][event.name] += event.self_cpu_time_total
        for child in event.cpu_children:
            walk(child, phase)

    for event in prof.events():
        if event.cpu_parent is None:
            walk(event, None)
    steps = max(1, len([e for e in prof.events() if e.name == "forward"]))
    return {
        phase: [
            {"op": op, "self_ms_per_step": round(us / 1000 / steps, 2)}
            for op, us in sorted(ops.items(), key=lambda kv: -kv[1])[:top]
        ]
        for phase, ops in totals.items()
    }


if __name__ == "__main__":
    main()
