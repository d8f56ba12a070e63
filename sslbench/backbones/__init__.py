"""Backbones behind the Encoder contract, and the one registry that rebuilds them from a spec.

A spec is the JSON dict an encoder carries in ``encoder.spec``; ``build_encoder(spec)`` rebuilds the
same architecture, which is how exported checkpoints and random-init baselines are made.
"""

from __future__ import annotations

from typing import Any, Callable

from sslbench.backbones.base import Encoder, Features
from sslbench.backbones.resnet import RESNET_LAYOUTS, ResNet
from sslbench.errors import ConfigError


def _resnet(spec: dict[str, Any]) -> Encoder:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "backbone"}
    return ResNet(depth=spec["backbone"], **kwargs)


def _ddpm_unet(spec: dict[str, Any]) -> Encoder:
    from sslbench.backbones.diffusion import diffusion_encoder_from_spec

    return diffusion_encoder_from_spec(spec)


BACKBONES: dict[str, Callable[[dict[str, Any]], Encoder]] = {
    **{name: _resnet for name in RESNET_LAYOUTS},
    "ddpm_unet": _ddpm_unet,
}


DEFAULT_DIFFUSION_READOUT = {"t": 11, "block": "mid"}
"""DDAE's CIFAR finding (and the C10-mini reference): small noise, middle block."""


def backbone_spec(name: str, width: float = 1.0, image_size: int = 32) -> dict[str, Any]:
    """The spec of a backbone named on the command line.

    ``resnet18|34|50`` (with ``width``; CIFAR stem up to 64 px, ImageNet stem above) and
    ``unet-<preset>`` for a DDPM U-Net read at DDAE's default noise level and block.
    """
    if name in RESNET_LAYOUTS:
        return {"backbone": name, "width": width, "stem": "cifar" if image_size <= 64 else "imagenet"}
    if name.startswith("unet-"):
        from sslbench.backbones.unet import UNET_PRESETS, unet_config_dict

        preset = name.removeprefix("unet-")
        if preset not in UNET_PRESETS:
            raise ConfigError(f"unknown U-Net preset {preset!r}; use one of {', '.join('unet-' + p for p in UNET_PRESETS)}")
        return {"backbone": "ddpm_unet", "unet": unet_config_dict(UNET_PRESETS[preset]), **DEFAULT_DIFFUSION_READOUT}
    known = [*RESNET_LAYOUTS, "unet-tiny", "unet-small", "unet-ddpm_cifar10"]
    raise ConfigError(f"unknown backbone {name!r}; use one of {', '.join(known)}")


def build_encoder(spec: dict[str, Any]) -> Encoder:
    """The encoder described by ``spec`` (weights freshly initialised)."""
    name = spec.get("backbone")
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; use one of {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](spec)


__all__ = ["BACKBONES", "Encoder", "Features", "backbone_spec", "build_encoder"]
