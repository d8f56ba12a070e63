"""C10-mini (../shared/BENCHMARKS.md): pretrain on CIFAR-10 images 0..9999, kNN top-1 on the 10,000 test images.

Reports, per method: seconds per epoch (kNN evaluation excluded), source images/s, peak memory, final loss and
kNN top-1 after epochs 5, 10, 15; and the floors: the same backbone at random init (seed 0) and raw pixels.

    python benchmarks/c10_mini.py --data-root DIR [--methods simclr ddae] [--epochs 15] [--report FILE]

DIR holds ``cifar-10-batches-py/`` (``python ../shared/data/materialize.py DIR cifar10``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from datetime import date
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

import sslbench
from sslbench.backbones import backbone_spec
from sslbench.data import load_dataset
from sslbench.engine import RunConfig, pretrain
from sslbench.evaluation import random_subject
from sslbench.tasks import ProbeConfig
from sslbench.tasks.classification import ClassificationTask
from sslbench.tasks.metrics import knn_predict

RESNET = backbone_spec("resnet18", 0.25)  # 16/32/64/128 channels, 3x3 stride-1 stem, no max-pool
RECIPES = {
    # C10-mini SimCLR recipe: batch 256, SGD 0.06 momentum 0.9 wd 5e-4, cosine, T=0.5, head 128-512-128.
    "simclr": dict(backbone=RESNET, options={}, train={"batch_size": 256, "optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4}),
    # DDAE: DDPM on the tiny U-Net (16/32/32 channels), AdamW 2e-4 (batch 128 as the DDAE reference); readout t=11, mid block.
    "ddae": dict(backbone=backbone_spec("unet-tiny"), options={"readout_t": 11, "readout_block": "mid"},
                 train={"batch_size": 128, "optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0}),
}


class KnnAtEpochs(Callback):
    """kNN top-1 of the exported encoder after the given epochs (runs after the epoch timer stops)."""

    def __init__(self, epochs: list[int], train, test, probe: ProbeConfig):
        self.epochs, self.train, self.test, self.probe = epochs, train, test, probe
        self.scores: dict[int, float] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.epochs:
            encoder = pl_module.export_encoder()
            was_training = encoder.training
            self.scores[epoch] = ClassificationTask().evaluate(encoder, self.train, self.test, "knn", self.probe)["top1"]
            encoder.train(was_training)
            print(f"  epoch {epoch}: kNN top-1 {self.scores[epoch]:.4f}", flush=True)


def raw_pixel_knn(train, test, probe: ProbeConfig) -> float:
    flat = lambda images: F.normalize(images.float().div(127.5).sub(1).flatten(1), dim=1)  # noqa: E731
    pred = knn_predict(flat(train.images), train.targets["class"], flat(test.images), 10, probe.knn_k, probe.knn_temperature)
    return (pred == test.targets["class"]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", type=Path, default=Path("runs/c10_mini"))
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw numbers here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    train = load_dataset("cifar10", args.data_root, "train", limit=10_000)
    test = load_dataset("cifar10", args.data_root, "test")
    probe = ProbeConfig(seed=0, device=device, knn_k=200, knn_temperature=0.1)
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, "
                               f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}",
                    "versions": f"sslbench {sslbench.__version__}, torch {torch.__version__}, lightning {lightning.__version__}",
                    "precision": args.precision, "date": str(date.today()), "floors": {}, "methods": {}}
    report["floors"]["raw pixels"] = raw_pixel_knn(train, test, probe)
    for method in args.methods:
        random_encoder = random_subject(RECIPES[method]["backbone"], "random", seed=0).encoder
        report["floors"][f"random init ({method} backbone)"] = ClassificationTask().evaluate(random_encoder, train, test, "knn", probe)["top1"]
    print(json.dumps(report["floors"], indent=1), flush=True)
    for method in args.methods:
        recipe = RECIPES[method]
        monitor = KnnAtEpochs(sorted({e for e in (5, 10, 15) if e <= args.epochs} | {args.epochs}), train, test, probe)
        out = args.out / method
        shutil.rmtree(out, ignore_errors=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = pretrain(method, train.images, RunConfig(out=out, accelerator=args.accelerator, devices="1", precision=args.precision, progress=False),
                          backbone=recipe["backbone"], options=recipe["options"], train={**recipe["train"], "epochs": args.epochs, "seed": 0},
                          callbacks=[monitor])
        report["methods"][method] = {
            "recipe": recipe["train"] | recipe["options"], "seconds_per_epoch": sum(result.epoch_seconds) / len(result.epoch_seconds),
            "images_per_second": result.images_per_second, "peak_memory_mb": result.peak_memory_mb,
            "final_loss": result.final_loss, "knn_top1": monitor.scores, "wall_seconds": time.perf_counter() - start,
        }
        print(json.dumps(report["methods"][method], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
