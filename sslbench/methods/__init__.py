"""Pretraining methods: one file each, registered here by name."""

from sslbench.methods.base import PretrainMethod, TrainConfig
from sslbench.methods.ddae import DDAE
from sslbench.methods.simclr import SimCLR

METHODS: dict[str, type[PretrainMethod]] = {
    "simclr": SimCLR,
    "ddae": DDAE,
}

__all__ = ["METHODS", "PretrainMethod", "TrainConfig"]
