"""Losses of classic knowledge distillation for classifiers (DESIGN.md, seeds 000-002).

``kd_loss``: alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y).
``corrected_targets``: the teacher's distribution where it is right, the one-hot gold label where
its argmax is wrong. ``HiddenStateLoss``: MSE between student and teacher hidden states through a
learned projection (widths may differ) and a layer map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def soft_targets(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's distribution at temperature T."""
    return F.softmax(teacher_logits / temperature, dim=-1)


def corrected_targets(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft targets, with the one-hot gold label in the rows where the teacher's argmax is wrong."""
    targets = soft_targets(teacher_logits, temperature)
    wrong = teacher_logits.argmax(-1) != labels
    if wrong.any():
        targets = targets.clone()
        targets[wrong] = F.one_hot(labels[wrong], targets.shape[-1]).to(targets.dtype)
    return targets


def kd_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """alpha * T^2 * KL(targets || softmax(z_s / T)) + (1 - alpha) * CE(z_s, labels); ``targets`` are
    probabilities (from :func:`soft_targets` or :func:`corrected_targets`)."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = F.kl_div(log_student, targets, reduction="batchmean")
    ce = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


class HiddenStateLoss(nn.Module):
    """MSE between mapped hidden layers: student layer i is pulled towards teacher layer layer_map[i]
    through a learned linear projection from the student's width to the teacher's."""

    def __init__(self, student_width: int, teacher_width: int, layer_map: Sequence[tuple[int, int]]):
        super().__init__()
        self.layer_map = list(layer_map)
        self.projection = (
            nn.Identity()
            if student_width == teacher_width
            else nn.Linear(student_width, teacher_width, bias=False)
        )

    def forward(
        self,
        student_hidden: Sequence[torch.Tensor],
        teacher_hidden: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        losses = []
        for s_layer, t_layer in self.layer_map:
            diff = (self.projection(student_hidden[s_layer]) - teacher_hidden[t_layer]) ** 2
            if attention_mask is not None:
                mask = attention_mask[..., None].to(diff.dtype)
                losses.append((diff * mask).sum() / (mask.sum() * diff.shape[-1]).clamp(min=1))
            else:
                losses.append(diff.mean())
        return torch.stack(losses).mean()


def sparse_topk_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per position, KL(teacher || student) on the teacher's top-k tokens: the teacher's log-probabilities
    (at T = 1, as captured) divided by T and renormalised over its k tokens, against the student's
    full-vocabulary log-softmax at T read at the same k ids. ``teacher_logprobs`` is -inf where an
    alternative is missing; a position with none gives 0.

    The direction is forward (teacher || student), as in classic KD: the student is pulled to cover every
    token the teacher finds likely, and only the teacher's side is known beyond its top-k, which is what
    a sum over the teacher's support needs (the reverse direction would need the teacher's probability of
    every token the student likes).

    Mass outside the top-k: the student is not renormalised over the k ids, so the teacher's renormalised
    target (no mass elsewhere) also pulls the student's mass outside the top-k towards zero. That is the
    intent for closed tasks (the target is the label set; any other first token is a wrong answer) and a
    small pull for free text at k = 20, where the captured top-k holds most of the teacher's mass. A
    student renormalised over the k ids would learn only the order inside them, nothing against tokens the
    teacher never considered. (A tail bucket, 1 - the top-k mass as one more class, would keep the
    teacher's tail at T = 1; it is not used here.)"""
    valid = torch.isfinite(teacher_logprobs)
    scaled = torch.where(
        valid, teacher_logprobs.float() / temperature, torch.full_like(teacher_logprobs.float(), -torch.inf)
    )
    norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_p = torch.where(valid, scaled - torch.where(torch.isfinite(norm), norm, 0.0), 0.0)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    return torch.where(valid, log_p.exp() * (log_p - log_q), 0.0).sum(-1)
