"""Pretraining methods: one file each, registered here by name."""

from sslbench.methods.base import PretrainMethod, TrainConfig
from sslbench.methods.byol import BYOL
from sslbench.methods.ddae import DDAE
from sslbench.methods.dino import DINO
from sslbench.methods.moco import MoCo
from sslbench.methods.simclr import SimCLR
from sslbench.methods.swav import SwAV

METHODS: dict[str, type[PretrainMethod]] = {
    "simclr": SimCLR,
    "ddae": DDAE,
    "moco": MoCo,
    "byol": BYOL,
    "swav": SwAV,
    "dino": DINO,
}

__all__ = ["METHODS", "PretrainMethod", "TrainConfig"]
