"""Backbones behind the Encoder contract, and the one registry that rebuilds them from a spec.

A spec is the JSON dict an encoder carries in ``encoder.spec``; ``build_encoder(spec)`` rebuilds the
same architecture, which is how exported checkpoints and random-init baselines are made.
"""

from __future__ import annotations

from typing import Any, Callable

from sslbench.backbones.base import Encoder, Features, spec_kwargs
from sslbench.backbones.resnet import RESNET_LAYOUTS, ResNet
from sslbench.errors import ConfigError


def _resnet(spec: dict[str, Any]) -> Encoder:
    return ResNet(**{**spec_kwargs(ResNet, spec, f"backbone {spec['backbone']!r}"), "depth": spec["backbone"]})


def _ddpm_unet(spec: dict[str, Any]) -> Encoder:
    from sslbench.backbones.diffusion import diffusion_encoder_from_spec

    return diffusion_encoder_from_spec(spec)


def _vit(spec: dict[str, Any]) -> Encoder:
    from sslbench.backbones.vit import VisionTransformer

    return VisionTransformer(**spec_kwargs(VisionTransformer, spec, "backbone 'vit'"))


def _timm(spec: dict[str, Any]) -> Encoder:
    from sslbench.backbones.timm_encoder import timm_encoder_from_spec

    return timm_encoder_from_spec(spec)


def _igpt(spec: dict[str, Any]) -> Encoder:
    from sslbench.backbones.igpt import igpt_encoder_from_spec

    return igpt_encoder_from_spec(spec)


def _projected(spec: dict[str, Any]) -> Encoder:
    from sslbench.backbones.projected import projected_encoder_from_spec

    return projected_encoder_from_spec(spec)


BACKBONES: dict[str, Callable[[dict[str, Any]], Encoder]] = {
    **{name: _resnet for name in RESNET_LAYOUTS},
    "ddpm_unet": _ddpm_unet,
    "igpt": _igpt,
    "projected": _projected,
    "timm": _timm,
    "vit": _vit,
}


DEFAULT_DIFFUSION_READOUT = {"t": 11, "block": "mid"}
"""DDAE's CIFAR finding (and the C10-mini reference): small noise, middle block."""


def backbone_spec(name: str, width: float = 1.0, image_size: int = 32) -> dict[str, Any]:
    """The spec of a backbone named on the command line.

    ``resnet18|34|50`` (with ``width``; CIFAR stem up to 64 px, ImageNet stem above) and
    ``unet-<preset>`` for a DDPM U-Net read at DDAE's default noise level and block;
    ``vit-nano|tiny|small`` for a ViT built at ``image_size``, ``vit-tiny/8`` to choose the patch size
    (default: 4 up to 64 px, 8 up to 128 px, 16 above); ``timm:NAME[?KEY=VALUE&...]`` for any timm model
    (pretrained weights unless ``pretrained=false``; see ``sslbench.backbones.timm_encoder``).
    """
    if name in RESNET_LAYOUTS:
        return {"backbone": name, "width": width, "stem": "cifar" if image_size <= 64 else "imagenet"}
    if name.startswith("unet-"):
        from sslbench.backbones.unet import UNET_PRESETS, unet_config_dict

        preset = name.removeprefix("unet-")
        if preset not in UNET_PRESETS:
            raise ConfigError(f"unknown U-Net preset {preset!r}; use one of {', '.join('unet-' + p for p in UNET_PRESETS)}")
        return {"backbone": "ddpm_unet", "unet": unet_config_dict(UNET_PRESETS[preset]), **DEFAULT_DIFFUSION_READOUT}
    if name.startswith("vit-"):
        return _vit_spec(name, image_size)
    if name.startswith("timm:"):
        from sslbench.backbones.timm_encoder import parse_timm_reference

        return parse_timm_reference(name)
    known = [*RESNET_LAYOUTS, "unet-tiny", "unet-small", "unet-small-lean", "unet-small-fast", "unet-ddpm_cifar10", "vit-nano", "vit-tiny", "vit-small", "timm:NAME"]
    raise ConfigError(f"unknown backbone {name!r}; use one of {', '.join(known)}")


def _vit_spec(name: str, image_size: int) -> dict[str, Any]:
    from sslbench.backbones.vit import VIT_PRESETS, default_patch_size

    preset, _, patch = name.removeprefix("vit-").partition("/")
    if preset not in VIT_PRESETS:
        raise ConfigError(f"unknown ViT preset {preset!r}; use one of {', '.join('vit-' + p for p in VIT_PRESETS)} (optionally /PATCH, e.g. vit-tiny/8)")
    if patch and not patch.isdigit():
        raise ConfigError(f"ViT patch size {patch!r} in {name!r} is not a number; write e.g. vit-tiny/8")
    patch_size = int(patch) if patch else default_patch_size(image_size)
    return {"backbone": "vit", **VIT_PRESETS[preset], "patch_size": patch_size, "image_size": image_size}


def build_encoder(spec: dict[str, Any], pretrained: bool = True) -> Encoder:
    """The encoder described by ``spec``, weights freshly initialised or, where the spec asks for them
    (``"pretrained": true``, as timm specs do), the published ones.

    ``pretrained=False`` builds the architecture only, with ``"pretrained": false`` in its spec: for
    random-init baselines, and for callers that load a state dict next (``load_encoder``), so that
    loading a checkpoint never downloads weights it is about to replace.
    """
    name = spec.get("backbone")
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; use one of {', '.join(sorted(BACKBONES))}")
    if not pretrained and spec.get("pretrained"):
        spec = {**spec, "pretrained": False}
    return BACKBONES[name](spec)


__all__ = ["BACKBONES", "Encoder", "Features", "backbone_spec", "build_encoder"]
