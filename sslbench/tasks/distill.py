"""Distillation with unlabelled images: SimCLRv2's third stage (Chen et al. 2020, section 2.3).

A teacher (a classifier fine-tuned on the few labelled images) gives every unlabelled image a soft
label; a student minimises the cross-entropy to it (the paper's distillation loss, its sum over images
taken as a batch mean):

    L = -mean_x sum_y P_T(y | x; tau) log P_S(y | x; tau),    P(y | x; tau) = softmax(logits(x) / tau).

No ground-truth label enters the loss: the paper's setting for few labels (it adds a weighted label
loss only as an option when labelled images are many). Teacher and student see the same augmented
view of each image, so the student is taught the teacher's answer on exactly what it sees.
Distillation is thus fine-tuning whose targets are the teacher's logits, and it runs in
``finetune``'s loop, with the same budget, seeding and learning rates as every protocol.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from sslbench.backbones.base import Encoder
from sslbench.data.base import ImageSet
from sslbench.tasks.finetune import Augment, finetune
from sslbench.tasks.heads import TaskHead
from sslbench.tasks.probe import ProbeConfig

DISTILLATION_TEMPERATURE = 1.0
"""tau of the distillation protocols: the teacher's plain softmax, no extra softening."""


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``-(softmax(t / tau) * log_softmax(s / tau)).sum(1).mean()`` (SimCLRv2, section 2.3), in float32.

    The teacher's distribution is a fixed target: no gradient reaches ``teacher_logits``.
    """
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return -(target * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(1).mean()


def distill(student_head: TaskHead, student: Encoder, teacher_head: TaskHead, teacher: Encoder, unlabelled: ImageSet,
            augmentation: Augment, config: ProbeConfig, temperature: float = DISTILLATION_TEMPERATURE) -> Encoder:
    """Train a deep copy of ``student`` and ``student_head`` (in place) to match the frozen teacher's
    softened predictions on ``augmentation`` views of ``unlabelled``; return the trained copy in eval mode.

    ``unlabelled``'s targets are never read. The teacher (``teacher_head`` on ``teacher``, both on
    ``config.device``) runs in eval mode without gradients.
    """
    teacher.eval()
    teacher_head.module.eval()

    def view_with_teacher_logits(images: torch.Tensor, image_ids: torch.Tensor,
                                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        views, _ = augmentation(images, image_ids, generator)
        with torch.no_grad():
            return views, teacher_head(teacher(views), tuple(views.shape[-2:]))

    # ``finetune`` indexes one target per image; unlabelled images have none, so they carry their ids,
    # which the view function above replaces by the teacher's logits.
    image_ids = torch.arange(len(unlabelled))
    return finetune(student_head, student, unlabelled, image_ids, partial(distillation_loss, temperature=temperature),
                    view_with_teacher_logits, config)
