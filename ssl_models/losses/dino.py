"""DINO's self-distillation loss: cross-entropy between a centred, sharpened teacher and the student.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", eq. (2)-(3)
and algorithm 1: P_t = softmax((g_t(x) - C) / tau_t), P_s = softmax(g_s(x') / tau_s),
L = sum over teacher views x (the global crops) and student views x' != x of H(P_t(x), P_s(x')),
averaged over the pairs; the teacher gets no gradient.

Every term is a per-image mean, so under data parallelism the mean of the ranks' losses is
the single-process loss; only the centre needs the whole batch (``batch_center``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_models.distributed import all_reduce_sum


def dino_loss(
    student_logits: list[torch.Tensor],
    teacher_logits: list[torch.Tensor],
    center: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> torch.Tensor:
    """``teacher_logits[i]`` and ``student_logits[i]`` are the same crop, for i < len(teacher_logits)."""
    targets = [F.softmax((t.detach() - center) / teacher_temperature, dim=-1) for t in teacher_logits]
    log_probs = [F.log_softmax(s / student_temperature, dim=-1) for s in student_logits]
    terms = [
        -(target * log_prob).sum(dim=-1).mean()
        for i, target in enumerate(targets)
        for j, log_prob in enumerate(log_probs)
        if i != j
    ]
    return torch.stack(terms).mean()


@torch.no_grad()
def batch_center(teacher_logits: list[torch.Tensor]) -> torch.Tensor:
    """The mean teacher output over every crop of the whole (global) batch, shape (1, K), eq. (4)."""
    stacked = torch.cat(teacher_logits)
    total = all_reduce_sum(torch.cat([stacked.sum(0), stacked.new_tensor([stacked.shape[0]])]))
    return (total[:-1] / total[-1]).unsqueeze(0)
