"""MoCo v3's contrastive loss: queries against the momentum encoder's keys of the whole batch.

Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers",
eq. (1) and algorithm 1: L_q = -log exp(q . k+ / tau) / sum_k exp(q . k / tau), where the keys
are the other view's momentum-encoder outputs of every image in the (global) batch, and the
loss is scaled by 2 tau as in the authors' code.

Under data parallelism the keys are gathered from all ranks (they carry no gradient), and
each rank's queries find their positive at their own offset in the gathered batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_models.distributed import gather, rank


def moco_v3_loss(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean InfoNCE of (N, D) queries; ``keys[i]`` is the positive of ``queries[i]``; keys get no gradient."""
    if queries.shape != keys.shape:
        raise ValueError(
            f"queries and keys must have the same shape, got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    q = F.normalize(queries, dim=1)
    k = gather(F.normalize(keys.detach(), dim=1))
    logits = q @ k.T / temperature
    positives = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, positives) * 2 * temperature
