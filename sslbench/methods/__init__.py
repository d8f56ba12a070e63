"""Pretraining methods: one file each, registered here by name."""

from sslbench.methods.base import PretrainMethod, TrainConfig
from sslbench.methods.beit import BEiTPalette
from sslbench.methods.byol import BYOL
from sslbench.methods.ddae import DDAE
from sslbench.methods.ddae_edm import DDAEEDM
from sslbench.methods.detcon import DetConB, DetConS
from sslbench.methods.dino import DINO
from sslbench.methods.igpt import IGPT
from sslbench.methods.mae import MAE
from sslbench.methods.moco import MoCo
from sslbench.methods.simclr import SimCLR
from sslbench.methods.simclrv2 import SimCLRv2
from sslbench.methods.swav import SwAV

METHODS: dict[str, type[PretrainMethod]] = {
    "simclr": SimCLR,
    "simclrv2": SimCLRv2,
    "ddae": DDAE,
    "ddae_edm": DDAEEDM,
    "moco": MoCo,
    "byol": BYOL,
    "swav": SwAV,
    "dino": DINO,
    "detcon_s": DetConS,
    "detcon_b": DetConB,
    "mae": MAE,
    "igpt": IGPT,
    "beit_palette": BEiTPalette,
}

__all__ = ["METHODS", "PretrainMethod", "TrainConfig"]
