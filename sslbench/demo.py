"""``sslbench demo``: the whole method x task matrix on the built-in scenes, in minutes on a laptop.

Pretrains SimCLR (CIFAR ResNet-18, quarter width) and DDAE (a small DDPM U-Net) on procedural
scenes, then evaluates them and the same two architectures at random initialisation on the four
task types with the same probe budget, and prints the table. Random init is shown for both
architectures because a U-Net and a ResNet differ even untrained: each method must beat its own.

The demo's budget is a few hundred optimiser steps, so it uses short-schedule recipes rather than the
long-run defaults: SimCLR with AdamW (lr 2e-3, batch 128, one warm-up epoch) instead of SGD at 0.06, and
DDAE at lr 1e-3 instead of DDPM's 2e-4 (tuned for 800k steps), which at this budget leaves the denoising
loss ten times higher and the features no better than random init.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from sslbench.backbones import backbone_spec
from sslbench.data.base import ImageSet
from sslbench.diffusion_study import select_readout
from sslbench.engine import RunConfig, pretrain
from sslbench.errors import SslbenchError
from sslbench.evaluation import EncoderUnderTest, checkpoint_subject, evaluate, load_splits, random_subject
from sslbench.results import load_rows, render_table
from sslbench.tasks import ProbeConfig, default_device


@dataclass(frozen=True)
class DemoScale:
    train_images: int
    test_images: int
    simclr_epochs: int
    ddae_epochs: int
    probe_epochs: int


FULL = DemoScale(train_images=4000, test_images=1000, simclr_epochs=18, ddae_epochs=6, probe_epochs=6)
FAST = DemoScale(train_images=512, test_images=256, simclr_epochs=1, ddae_epochs=1, probe_epochs=2)

EVALUATIONS = (("classification", "knn"), ("classification", "linear"), ("counting", "linear"),
               ("depth", "probe"), ("segmentation", "probe"))


DDAE_READOUT_LEVELS = [11.0, 50.0]
DDAE_READOUT_BLOCKS = ["mid", "up2.1", "up1.1", "up0.1"]
"""The readouts the demo chooses DDAE's from: the paper's t = 11 and a noisier level, the middle block and
the last ResBlock of each decoder level (where short training puts the best features)."""


def best_ddae_readout(subject: EncoderUnderTest, train: ImageSet, probe: ProbeConfig, console: Console) -> EncoderUnderTest:
    """DDAE read at its best (t, block), chosen by kNN (``probe``'s k and temperature) on a held-out quarter
    of the training images."""
    start = time.perf_counter()
    blocks = [name for name in DDAE_READOUT_BLOCKS if name in subject.encoder.unet.block_names()]
    encoder, _ = select_readout(subject.encoder, train, DDAE_READOUT_LEVELS, blocks, probe)
    console.print(f"  ddae readout: t={encoder.t:g}, block {encoder.block} (best validation kNN of "
                  f"{len(DDAE_READOUT_LEVELS) * len(blocks)} readouts, {time.perf_counter() - start:.0f} s)")
    return replace(subject, encoder=encoder, method=f"ddae[t={encoder.t:g},{encoder.block}]")


def run_demo(out: Path, fast: bool = False, seed: int = 0, overwrite: bool = False) -> None:
    console = Console()
    scale = FAST if fast else FULL
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SslbenchError(f"demo output folder {out} is not empty; pass --overwrite to replace it or choose another --out")
        shutil.rmtree(out)
    start = time.perf_counter()
    train, test = load_splits("scenes", None, None, scale.train_images, scale.test_images)
    console.print(f"[bold]sslbench demo[/bold]: {len(train)} train / {len(test)} test procedural scenes at "
                  f"{train.image_size[0]}px, {'fast' if fast else 'full'} scale")

    resnet = backbone_spec("resnet18", 0.25, train.image_size[0])
    unet = backbone_spec("unet-tiny" if fast else "unet-small", image_size=train.image_size[0])
    runs = {
        "simclr": dict(backbone=resnet, train={"epochs": scale.simclr_epochs, "batch_size": 128, "seed": seed,
                                               "optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4, "warmup_epochs": 1}),
        "ddae": dict(backbone=unet, train={"epochs": scale.ddae_epochs, "batch_size": 128, "seed": seed,
                                           "lr": 1e-3, "warmup_epochs": 0.5}),
    }
    # Dense heads read maps of stride >= 2 through a 32-wide decoder: the same for every encoder, and
    # cheap enough for a laptop CPU.
    probe = ProbeConfig(epochs=scale.probe_epochs, seed=seed, dense_batch_size=64, decoder_width=32, finest_stride=2,
                        device=default_device())
    subjects = [random_subject(resnet, "random-resnet18", seed), random_subject(unet, "random-unet", seed)]
    for method, kwargs in runs.items():
        console.print(f"pretraining [bold]{method}[/bold] ...")
        result = pretrain(method, train.images, RunConfig(out=out / method), info={"data": "scenes"}, **kwargs)
        console.print(f"  {method}: {sum(result.epoch_seconds):.0f} s, {result.images_per_second:.0f} images/s, final loss {result.final_loss:.3f}")
        subject = checkpoint_subject(out / method)
        subjects.append(best_ddae_readout(subject, train, probe, console) if method == "ddae" else subject)

    for subject in subjects:
        for task, protocol in EVALUATIONS:
            metrics = evaluate(subject, task, protocol, "scenes", train, test, probe, out)
            console.print(f"  {subject.method:16s} {task}/{protocol}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    render_table(load_rows(out), title=f"sslbench demo ({time.perf_counter() - start:.0f} s) - {out}/results.jsonl")
