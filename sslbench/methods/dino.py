"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"), for ResNets and ViTs.

A student network matches the output distribution of a teacher (EMA of the student) across views:
the teacher sees only the two global crops, the student all crops, and the cross-entropy is taken
over every (teacher view, student view) pair of *different* views. Collapse is avoided by centring
(subtracting a running mean of the teacher outputs) and sharpening (a low teacher temperature).

Head (paper): 3-layer MLP without BN [D, 2048, 2048, 256] with GELU, L2 normalisation, then a
weight-normalised linear layer (norm fixed to 1) to K prototypes. The paper uses K = 65536 on
ImageNet; at CIFAR scale K = 4096 (solo-learn's CIFAR config) is the default here.
Teacher momentum 0.996 -> 1 (cosine over all steps), centre momentum 0.9, student temperature 0.1,
teacher temperature warmed up linearly from 0.04 to 0.07 over the first 3 epochs (the paper warms up
over 30 of 300 epochs; 3 suits the short CIFAR-scale runs this benchmark makes), last layer frozen
during the first epoch (official ``freeze_last_layer``). Crops follow the official ResNet-50 recipe:
global scale 0.14-1, local 0.05-0.14 (half resolution), 2 local crops by default; views as the
paper: blur p 1.0 / 0.1 / 0.5 (global 1, global 2, locals; ``blur_p``) and solarisation p 0.2 on global 2.
Gradients of the student are clipped per parameter to norm 3.0 with every backbone (``clip_grad``; 0
disables): the official default (``main_dino.py --clip_grad 3.0``), which the official README's
ResNet-50 command (SGD, lr 0.03, 100 epochs) keeps, as it gives no ``--clip_grad``.
On runs of a few steps the clipping slows the first large moves of the last layer, so short ResNet
experiments may prefer ``clip_grad=0``.
The exported encoder is the teacher's.

With a ViT backbone the small crops go through the same network at half resolution (the ViT resizes
its position embedding to their grid) and the official ViT optimisation is the default: AdamW, lr
0.0005 x batch / 256, linear warm-up over the first 10% of training (10 of the paper's 100 epochs),
weight decay 0.04 (the paper's starting value; its cosine growth to 0.4 is not applied). The crop
scales stay those above; the official ViT runs use global 0.4-1 and local 0.05-0.4 (set them with
``global_scale`` / ``local_scale``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.augment import ViewConfig
from sslbench.backbones import Encoder
from sslbench.config import check_range
from sslbench.methods.base import PretrainMethod, TrainConfig
from sslbench.methods.parts import (MLPHead, cosine_schedule, ema_update, frozen_copy, gather_no_grad, multicrop_views,
                                    pooled_by_resolution)


def dino_loss(student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Cross-entropy between the centred, sharpened teacher and the student over pairs of different views.

    loss = mean over (t, s), s != t of mean_b sum_k -softmax((g_t - c)/T_t)[b, k] log softmax(g_s/T_s)[b, k],
    where teacher view t indexes the global views (which are also the first student views).
    """
    total = student_out[0].new_zeros((), dtype=torch.float32)
    pairs = 0
    for t, teacher in enumerate(teacher_out):
        target = F.softmax((teacher.float() - center) / teacher_temp, dim=1)
        for s, student in enumerate(student_out):
            if s == t:
                continue
            total = total + (-target * F.log_softmax(student.float() / student_temp, dim=1)).sum(1).mean()
            pairs += 1
    return total / pairs


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
    """c <- m c + (1 - m) mean over the global batch of the teacher outputs (DINO eq. 4)."""
    batch_center = gather_no_grad(teacher_out.float()).mean(0)
    return center * momentum + batch_center * (1 - momentum)


@torch.no_grad()
def clip_gradients_per_parameter(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """Rescale each parameter's gradient on its own to L2 norm <= ``max_norm`` (DINO's ``clip_gradients``).

    Unlike ``torch.nn.utils.clip_grad_norm_`` (one global norm), a single exploding layer is tamed
    without shrinking the updates of all the others.
    """
    for param in parameters:
        if param.grad is not None:
            param.grad.mul_((max_norm / (param.grad.norm() + 1e-6)).clamp(max=1.0))


class NormalizedLinear(nn.Module):
    """Linear layer without bias whose weight rows are unit vectors: weight norm with g fixed to 1.

    Equal to DINO's ``weight_norm(nn.Linear(in, out, bias=False))`` with ``weight_g`` filled with 1 and
    frozen (``norm_last_layer``). The direction ``v`` starts as ``nn.Linear``'s default initialisation,
    as in the official head: the norm of ``v`` sets the step size of the normalised rows (the gradient
    of v / |v| scales with 1 / |v|), so this initialisation is part of the recipe.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear.reset_parameters: U(-1/sqrt(in), 1/sqrt(in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """DINO's projection head: MLP (GELU, no BN) to a bottleneck, L2 normalisation, ``NormalizedLinear``.

    The MLP's linear layers start from a truncated normal (std 0.02) with zero biases, the official
    ``DINOHead._init_weights``; the last layer keeps its own initialisation (see ``NormalizedLinear``).
    """

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, prototypes: int, batch_norm: bool = False, layers: int = 3):
        super().__init__()
        self.mlp = MLPHead([in_dim, *[hidden] * (layers - 1), bottleneck], batch_norm=batch_norm, activation=nn.GELU)
        for layer in self.mlp.modules():
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        self.last_layer = NormalizedLinear(bottleneck, prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=1))


@dataclass
class DINOOptions:
    hidden: int = 2048
    bottleneck: int = 256
    prototypes: int = 4096
    student_temperature: float = 0.1
    teacher_temperature: float = 0.07
    warmup_teacher_temperature: float = 0.04
    warmup_teacher_epochs: float = 3.0
    center_momentum: float = 0.9
    momentum_start: float = 0.996
    momentum_end: float = 1.0
    local_views: int = 2
    global_scale: tuple[float, float] = (0.14, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.14)
    freeze_last_layer_epochs: int = 1
    clip_grad: float = 3.0
    head_batch_norm: bool = False
    """BatchNorm after the head's hidden layers (the official ``use_bn_in_head``). A random ResNet's pooled vectors
    are nearly parallel, so without it the teacher's centred outputs start almost uniform, and short runs can stay
    in the uniform collapse (loss = log prototypes)."""
    head_layers: int = 3
    """Linear layers of the head's MLP before the bottleneck's normalisation (the official ``nlayers``; 1 is a single
    linear map). lightly's CIFAR-10 benchmark uses 2 with a ResNet-18."""
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    """Gaussian blur probability of global view 1, global view 2 and the local views (the paper's; CIFAR recipes,
    such as solo-learn's, use no blur at 32 px)."""


class DINO(PretrainMethod):
    name = "dino"
    Options = DINOOptions

    @classmethod
    def derived_train_defaults(cls, backbone: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
        if backbone.get("backbone") != "vit":
            return {}
        return {"optimizer": "adamw", "lr": 5e-4 * train.batch_size / 256, "weight_decay": 0.04,
                "warmup_epochs": 0.1 * train.epochs}

    def build(self) -> None:
        o = self.options
        check_range("clip_grad", o.clip_grad, 0.0)
        check_range("freeze_last_layer_epochs", o.freeze_last_layer_epochs, 0)
        check_range("head_layers", o.head_layers, 1)
        self.head = DINOHead(self.encoder.pooled_dim, o.hidden, o.bottleneck, o.prototypes, batch_norm=o.head_batch_norm,
                             layers=o.head_layers)
        self.teacher_encoder = frozen_copy(self.encoder)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(o.prototypes))
        base = ViewConfig(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        views = multicrop_views(base, self.image_size, self.image_size // 2, o.local_views, o.global_scale, o.local_scale)
        global_blur_1, global_blur_2, local_blur = o.blur_p
        for view, blur in zip(views, [global_blur_1, global_blur_2] + [local_blur] * o.local_views):
            view.blur_p = blur
        views[1] = dataclasses.replace(views[1], solarize_p=0.2)
        self.views = self.make_views(views)

    def teacher_temperature(self) -> float:
        o = self.options
        warmup_steps = o.warmup_teacher_epochs * self.steps_per_epoch
        if self.global_step >= warmup_steps:
            return o.teacher_temperature
        return o.warmup_teacher_temperature + (o.teacher_temperature - o.warmup_teacher_temperature) * self.global_step / warmup_steps

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        o = self.options
        views = self.views(images, generator)
        student = [self.head(p) for p in pooled_by_resolution(self.encoder, views)]
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_encoder(torch.cat(views[:2])).pooled)
        teacher_temp = self.teacher_temperature()
        loss = dino_loss(student, list(teacher.chunk(2)), self.center, o.student_temperature, teacher_temp)
        self.center.copy_(update_center(self.center, teacher, o.center_momentum))
        return loss, {"teacher_temperature": teacher_temp}

    def on_after_backward(self) -> None:
        if self.current_epoch < self.options.freeze_last_layer_epochs:
            self.head.last_layer.weight.grad = None

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Lightning calls this hook after backward (and after unscaling fp16 gradients) before every step.
        if self.options.clip_grad > 0:
            clip_gradients_per_parameter([*self.encoder.parameters(), *self.head.parameters()], self.options.clip_grad)

    def after_optimizer_step(self) -> None:
        momentum = cosine_schedule(self.global_step, self.total_steps, self.options.momentum_start, self.options.momentum_end)
        ema_update(self.teacher_encoder, self.encoder, momentum)
        ema_update(self.teacher_head, self.head, momentum)

    def export_encoder(self) -> Encoder:
        return self.teacher_encoder
