"""Every method is data-parallel correct: a real 2-process gloo group on CPU.

World size 2 with B images per rank must give the single-process loss and gradients of the
same 2B images: the mean of the ranks' losses, the gradients DistributedDataParallel
averages, and the state after ``on_step_end`` (BatchNorm statistics, EMA targets, DINO's
centre). Float64, so a real discrepancy stands out from rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from ssl_models import METHODS
from ssl_models.augment import AugmentParams
from ssl_models.distributed import SyncBatchNorm, all_reduce_sum, convert_sync_batchnorm, gather
from tests.method_fixtures import small_method

WORLD = 2
PER_RANK = 4


def _method_and_views(name: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    method = small_method(name).double()
    images = torch.rand(WORLD * PER_RANK, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    views = method.make_views(images, AugmentParams(), torch.Generator().manual_seed(2))
    return method, [v.double() for v in views]


def _step(method: torch.nn.Module, views: list[torch.Tensor]) -> dict[str, object]:
    """One forward/backward and ``on_step_end``; what a correct data-parallel run must reproduce."""
    loss = method(views)
    loss.backward()
    module = method.module if isinstance(method, DistributedDataParallel) else method
    grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
    module.on_step_end(0.5)
    loss = all_reduce_sum(loss.detach()) / (dist.get_world_size() if dist.is_initialized() else 1)
    return {"loss": loss, "grads": grads, "state": {k: v.clone() for k, v in module.state_dict().items()}}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name in sorted(METHODS):
            method, views = _method_and_views(name)
            ddp = DistributedDataParallel(convert_sync_batchnorm(method))
            local = [v.chunk(WORLD)[rank] for v in views]
            results[name] = _step(ddp, local)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, object]]]:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_world_2_equals_single_process_with_twice_the_batch(
    name: str, distributed_results: list[dict[str, dict[str, object]]]
) -> None:
    method, views = _method_and_views(name)
    single = _step(method, views)
    for rank, per_rank in enumerate(distributed_results):
        result = per_rank[name]
        torch.testing.assert_close(result["loss"], single["loss"], rtol=1e-9, atol=1e-12)
        assert result["grads"].keys() == single["grads"].keys(), f"rank {rank}"
        for key, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][key], grad, rtol=1e-7, atol=1e-10, msg=f"grad {key}")
        for key, value in single["state"].items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-7, atol=1e-10, msg=f"state {key}")


def test_helpers_are_identity_in_a_single_process() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert gather(x) is x and all_reduce_sum(x) is x


def test_sync_batchnorm_matches_batchnorm_in_a_single_process() -> None:
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.3))
    with torch.no_grad():
        bn[0].weight.uniform_(0.5, 2)
    sync = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.3)))
    sync.load_state_dict(bn.state_dict())
    assert isinstance(sync[0], SyncBatchNorm)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.state_dict(), bn.state_dict())
