"""Knowledge distillation: the student matches the teacher's temperature-softened predictions.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", section 2:
q_i = exp(z_i / T) / sum_j exp(z_j / T), and "since the magnitudes of the gradients produced
by the soft targets scale as 1/T^2 it is important to multiply them by T^2 when using both
hard and soft targets". The KL divergence used here differs from the cross entropy with the
soft targets by the teacher's entropy, a constant for the student, so the loss is 0 when the
student agrees with the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch.

    No gradient flows to ``teacher_logits``; the gradient w.r.t. the student's logits is
    T * (softmax(student / T) - softmax(teacher / T)) / N.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
