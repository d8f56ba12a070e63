"""sslbench's side of ``ddae_vs_diffusers.py`` alone, for a U-Net built from ``unet-small`` with other settings.

Trying a U-Net design against diffusers' model costs one full side-by-side run, most of it diffusers' own training,
whose result does not change (``speed.md``: its loss and best cell agree across runs and machines). This trains
only sslbench's side, with the benchmark's recipe (3 epochs of the C10-mini training images, fp32, seed 0 or --seed) and
``UNetConfig`` changes given as JSON, then prints the network's multiply-adds per image, its parameters, the epoch
losses and the benchmark's readout grid with the same cell at random init. ``speed.md`` section 8 quotes it. Its
images/s are not the benchmark's: use ``unet_step.py`` for speed, and ``ddae_vs_diffusers.py`` for the report.

    python benchmarks/ddae_variant.py --data-root DIR --out DIR --threads 1 \\
        --unet '{"patch_size": 2, "base_channels": 64, "channel_mults": [1, 1, 1], "attention_resolutions": [8],
                 "decoder_res_blocks": 1, "upsample_conv": false}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddae_vs_diffusers import SideBySideSettings, read_out, recipe  # noqa: E402  (benchmarks/ is a folder of scripts)
from speed_vs_lightly import numpy_state, training_images  # noqa: E402
from unet_step import block_macs  # noqa: E402

from sslbench.backbones import build_encoder  # noqa: E402
from sslbench.data import load_dataset  # noqa: E402
from sslbench.engine import RunConfig, pretrain  # noqa: E402
from sslbench.tasks import ProbeConfig  # noqa: E402

EPOCHS = 3
PRECISION = "32-true"


class KeepEncoder(Callback):
    """The exported encoder's weights at the end of training (the EMA ones for DDAE), as the benchmark's worker sends them."""

    state: dict | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.state = numpy_state(pl_module.export_encoder())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--unet", required=True, help="UNetConfig changes to unet-small, as a JSON object.")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="The training seed and the random-init floor's, as ddae_vs_diffusers.py --seed.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = recipe("small")
    spec["backbone"]["unet"].update(json.loads(args.unet))
    net = build_encoder(spec["backbone"]).unet
    print(f"U-Net {spec['backbone']['unet']}: {sum(block_macs(net).values()) / 1e6:.1f}M multiply-adds per image, "
          f"{sum(p.numel() for p in net.parameters()):,} parameters", flush=True)

    settings = SideBySideSettings(args.data_root, EPOCHS, None, args.threads, args.out, method="ddae", recipe=spec,
                                  precision=PRECISION, knn_at=())
    train = training_images(settings)
    test = load_dataset("cifar10", args.data_root, "test")
    keep = KeepEncoder()
    result = pretrain("ddae", train.images, RunConfig(out=args.out, accelerator="cpu", devices="1", precision=PRECISION, progress=False),
                      backbone=spec["backbone"], options=spec["options"], train={**spec["train"], "epochs": EPOCHS, "seed": args.seed},
                      callbacks=[keep])
    print("epoch losses:", ", ".join(f"{loss:.4f}" for loss in result.epoch_losses), flush=True)
    readout = read_out("sslbench", keep.state, train, test, ProbeConfig(seed=0, device="cpu", knn_k=200, knn_temperature=0.1),
                       spec["backbone"], seed=args.seed)
    for cell in readout.cells:
        print(f"t = {cell.t}, {cell.block}: {cell.top1:.2%}")
    print(f"best: {readout.best.top1:.2%} (t = {readout.best.t}, {readout.best.block}); "
          f"same cell at random init: {readout.random_init_top1:.2%}")


if __name__ == "__main__":
    main()
