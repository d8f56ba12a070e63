"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

An online network (encoder, projector, predictor) predicts the projection of the other view made by
a target network (EMA of encoder + projector, no predictor). No negatives: the predictor and the
slowly moving target keep the representation from collapsing. The target momentum rises from 0.99
to 1.0 by a cosine over all training steps (paper, Sec. 3.2).

Defaults: projector and predictor [D, 4096, 256] with BN (paper); views with blur p 1.0 / 0.1 and
solarisation p 0 / 0.2 (paper's asymmetric pair), jitter 0.4/0.4/0.2/0.1 p 0.8, grey 0.2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslbench.augment import ViewConfig
from sslbench.errors import ConfigError
from sslbench.methods.base import PretrainMethod
from sslbench.methods.parts import MLPHead, cosine_schedule, ema_update, frozen_copy


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z) (BYOL eq. 2).

    ``target`` should come from the target network (no gradient); it is not detached here.
    """
    return (2 - 2 * F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()


def byol_views(size: int, blur_p: tuple[float, float], solarize_p: tuple[float, float],
               crop_scale: tuple[float, float] = (0.08, 1.0)) -> list[ViewConfig]:
    """BYOL's asymmetric pair of views: jitter 0.4/0.4/0.2/0.1 p 0.8, grey 0.2, per-view blur and solarisation."""
    return [ViewConfig(size=size, crop_scale=crop_scale, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                       blur_p=blur, solarize_p=solarize)
            for blur, solarize in zip(blur_p, solarize_p)]


@dataclass
class BYOLOptions:
    projection_hidden: int = 4096
    projection_dim: int = 256
    prediction_hidden: int = 4096
    momentum_start: float = 0.99
    momentum_end: float = 1.0
    blur_p: tuple[float, float] = (1.0, 0.1)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    # The predictor's lr relative to the rest (Tian et al. 2021, "Understanding self-supervised learning dynamics
    # without contrastive pairs": a faster predictor helps BYOL and SimSiam); the paper uses 1.
    predictor_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.predictor_lr_scale > 0:
            raise ConfigError(f"option predictor_lr_scale={self.predictor_lr_scale} is out of range; use a positive factor, e.g. 10")


class BYOL(PretrainMethod):
    name = "byol"
    Options = BYOLOptions

    def build(self) -> None:
        o = self.options
        self.projection = MLPHead([self.encoder.pooled_dim, o.projection_hidden, o.projection_dim])
        self.prediction = MLPHead([o.projection_dim, o.prediction_hidden, o.projection_dim])
        self.target_encoder = frozen_copy(self.encoder)
        self.target_projection = frozen_copy(self.projection)
        self.views = self.make_views(byol_views(self.image_size, o.blur_p, o.solarize_p, o.crop_scale))

    def lr_scales(self) -> dict[str, float]:
        return {"prediction": self.options.predictor_lr_scale}

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        v1, v2 = self.views(images, generator)
        both = torch.cat([v1, v2])
        p1, p2 = self.prediction(self.projection(self.encoder(both).pooled)).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projection(self.target_encoder(both).pooled).chunk(2)
        # The two directions are averaged; the paper sums them, so its SGD step at lr x is this loss's at 2x.
        loss = (byol_loss(p1, z2) + byol_loss(p2, z1)) / 2
        return loss, {"target_momentum": self.target_momentum()}

    def target_momentum(self) -> float:
        return cosine_schedule(self.global_step, self.total_steps, self.options.momentum_start, self.options.momentum_end)

    def after_optimizer_step(self) -> None:
        momentum = self.target_momentum()
        ema_update(self.target_encoder, self.encoder, momentum)
        ema_update(self.target_projection, self.projection, momentum)
