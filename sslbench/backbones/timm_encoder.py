"""Any timm model behind the Encoder contract, so external encoders are evaluated with our protocol.

``timm.create_model(name, features_only=True)`` gives the model's stage outputs together with the
reduction (stride) of each, as timm reports it in ``feature_info``; they become ``maps`` keyed by that
stride, and ``pooled`` is the global average of the deepest one. Inputs are normalised with the
model's own mean/std (timm's ``pretrained_cfg``), so pretrained weights see what they were trained on.

On the command line and in bench configs a timm encoder is written ``timm:NAME``, with options after a
``?`` joined by ``&``: ``timm:resnet50`` (pretrained weights, the default), ``timm:resnet50?pretrained=false``
(random init), ``timm:vit_tiny_patch16_224?img_size=32`` (any other KEY=VALUE goes to ``create_model``).
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
import yaml

from sslbench.backbones.base import Encoder, Features, Normalize
from sslbench.errors import ConfigError, SslbenchError

TIMM_PREFIX = "timm:"


def parse_timm_reference(reference: str) -> dict[str, Any]:
    """The spec of ``timm:NAME[?KEY=VALUE&...]`` (the ``timm:`` prefix is optional here).

    Values are read as YAML scalars (``false``, ``16``, ``0.1``), so ``pretrained=false`` is a bool.
    """
    name, _, query = reference.removeprefix(TIMM_PREFIX).partition("?")
    if not name:
        raise ConfigError(f"timm encoder {reference!r} names no model; write timm:NAME, e.g. timm:resnet50")
    options: dict[str, Any] = {}
    for pair in filter(None, query.split("&")):
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ConfigError(f"timm option {pair!r} in {reference!r} is not KEY=VALUE; write e.g. timm:{name}?pretrained=false")
        options[key] = yaml.safe_load(value)
    pretrained = options.pop("pretrained", True)
    if not isinstance(pretrained, bool):
        raise ConfigError(f"timm option pretrained={pretrained!r} in {reference!r} is not a bool; use pretrained=true or pretrained=false")
    return {"backbone": "timm", "name": name, "pretrained": pretrained, "model_args": options}


def timm_label(spec: dict[str, Any]) -> str:
    """``timm:NAME`` plus any model options, the name a timm encoder carries in result rows."""
    options = "&".join(f"{key}={value}" for key, value in spec.get("model_args", {}).items())
    return f"{TIMM_PREFIX}{spec['name']}" + (f"?{options}" if options else "")


def check_timm_name(name: str) -> None:
    """Raise a one-line ConfigError with the closest timm names when ``name`` (optionally ``.tag``) is unknown."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
    raise ConfigError(f"unknown timm model {name!r}; {hint}")


class TimmEncoder(Encoder):
    """A ``features_only`` timm model: ``maps`` keyed by timm's reported reductions, ``pooled`` = GAP of the deepest map.

    Models whose stages share a reduction (a ViT reports every block at 16) keep the deepest map of
    each stride, since the contract has one map per stride. Swin-like models that return channels-last
    maps are permuted to (B, C, H, W).
    """

    def __init__(self, name: str, pretrained: bool = False, model_args: dict[str, Any] | None = None):
        super().__init__()
        import timm

        check_timm_name(name)
        model_args = dict(model_args or {})
        try:
            self.model = timm.create_model(name, pretrained=pretrained, features_only=True, **model_args)
        except OSError as error:
            raise SslbenchError(
                f"could not fetch the pretrained weights of timm model {name!r} ({type(error).__name__}); cache them once "
                f"online (or copy a Hugging Face cache to HF_HOME), set HF_HUB_OFFLINE=1 to read that cache without "
                f"retries, or use timm:{name}?pretrained=false for random init") from None
        except TypeError as error:
            raise ConfigError(f"timm model {name!r} rejects the options {model_args} ({error}); drop or fix them") from None
        except RuntimeError as error:
            raise ConfigError(f"timm could not build {name!r} as a feature extractor ({str(error).splitlines()[0]}); "
                              "choose a model with feature maps (e.g. a ResNet, ConvNeXt or ViT) and check its options") from None
        config = self.model.pretrained_cfg
        self.normalize = Normalize(tuple(config["mean"]), tuple(config["std"]))
        self.channels_last_output = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self.strides = [int(s) for s in self.model.feature_info.reduction()]
        channels = self.model.feature_info.channels()
        self.map_channels = dict(zip(self.strides, channels))  # later (deeper) maps win a shared stride
        self.pooled_dim = int(channels[-1])
        self.spec = {"backbone": "timm", "name": name, "pretrained": pretrained, "model_args": model_args}

    def forward(self, images: torch.Tensor) -> Features:
        outputs = self.model(self.normalize(images))
        if self.channels_last_output:
            outputs = [output.permute(0, 3, 1, 2) for output in outputs]
        maps = dict(zip(self.strides, outputs))
        return Features(pooled=outputs[-1].mean((2, 3)), maps=maps)


def timm_encoder_from_spec(spec: dict[str, Any]) -> TimmEncoder:
    """Rebuild a ``TimmEncoder`` from its spec (``name``, ``pretrained``, ``model_args``)."""
    if "name" not in spec:
        raise ConfigError("timm encoder spec has no 'name'; write it as {'backbone': 'timm', 'name': 'resnet50'}")
    return TimmEncoder(spec["name"], pretrained=bool(spec.get("pretrained", False)), model_args=spec.get("model_args"))
