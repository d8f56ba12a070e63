"""C10-mini (../shared/BENCHMARKS.md): pretrain on CIFAR-10 images 0..9999, kNN top-1 on the 10,000 test images.

Reports, per method: seconds per epoch (kNN evaluation excluded), source images/s, peak memory, final loss and
kNN top-1 after epochs 5, 10, 15; and the floors: the same backbone at random init (seed 0, evaluated after the
method's run) and raw pixels. Peak memory is the process's peak resident memory, so it is only per method when
``--methods`` names one method (the full runs: one invocation per method).

With ``--linear`` each method (and each random-init floor) also gets a linear probe on its final encoder
(``ClassificationTask`` protocol ``linear``: the frozen encoder's pooled vector, ``ProbeConfig`` defaults, i.e. AdamW
1e-3, batch 256, ``--linear-epochs`` epochs), trained on the pretraining images and scored on the test images.

    python benchmarks/c10_mini.py --data-root DIR [--methods simclr ddae] [--epochs 15] [--linear] [--json FILE]
    python benchmarks/c10_mini.py --data-root DIR --methods moco --set lr=0.06 --set queue_size=1024  # a recipe sweep

``--set KEY=VALUE`` changes the recipe of every method run: a training setting (``TrainConfig``) or a method option.

``--limit N`` (pretrain and kNN memory on the first N training images, queries the first N test images) is a
smoke test, NOT the protocol: the report then says so in its ``protocol`` field.

DIR holds ``cifar-10-batches-py/`` (``python ../shared/data/materialize.py DIR cifar10``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

import sslbench
from sslbench.backbones import Encoder, backbone_spec, build_encoder
from sslbench.backbones.igpt import ImageGPTEncoder
from sslbench.data import ImageSet, load_dataset
from sslbench.engine import RunConfig, cpu_has_native_bf16, load_encoder, pretrain
from sslbench.evaluation import random_subject
from sslbench.tasks import ProbeConfig
from sslbench.tasks.classification import ClassificationTask
from sslbench.tasks.metrics import knn_predict

RESNET = backbone_spec("resnet18", 0.25)  # 16/32/64/128 channels, 3x3 stride-1 stem, no max-pool
VIT_MINI = {"backbone": "vit", "dim": 128, "depth": 6, "heads": 4, "patch_size": 4, "image_size": 32}
"""Not the protocol's ResNet (a ViT method needs a ViT): 128 wide, 6 blocks, 4 heads, patch 4 (8x8 tokens), 1.2M
parameters, close to the quarter-width ResNet-18's 0.7M and cheap enough for 15 CPU epochs."""
UNET_TINY = backbone_spec("unet-tiny")  # 16/32/32 channels, 0.27M parameters: the lean U-Net the protocol asks for
DDPM_TRAIN = {"batch_size": 128, "optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0}
"""DDPM training of every diffusion recipe here and in ddae_vs_diffusers.py: AdamW 2e-4, batch 128 (the DDAE reference)."""
# solo-learn's CIFAR configs (scripts/pretrain/cifar/*.yaml) train BYOL, SwAV and DINO with LARS (lr 1.0 / 0.6 / 0.3,
# eta 0.02, wd 1e-5 / 1e-6). Their layer-wise trust ratio makes those learning rates meaningless for plain SGD, and
# with sslbench's LARS (optimizer=lars) they did no better in 5-epoch sweeps (methods_c10_mini.md), so those methods
# use what lightly's CIFAR benchmark uses for all of them, which is also the protocol's SimCLR optimiser: SGD lr
# 0.06, momentum 0.9, weight decay 5e-4, cosine, no warm-up.
SGD = {"batch_size": 256, "optimizer": "sgd", "lr": 0.06, "momentum": 0.9, "weight_decay": 5e-4}
# The methods without negatives (BYOL, SwAV, DINO) learn slowly per step. They train at lightly's CIFAR batch of 128
# (lightly pairs it with lr 0.06), twice the steps of the protocol's 256 in 15 epochs, with the lr held constant
# (their schedules' cosine spans hundreds of epochs): each gained several points from it (methods_c10_mini.md).
SGD_MORE_STEPS = {**SGD, "batch_size": 128, "final_lr_scale": 1.0}
RECIPES = {
    # C10-mini SimCLR recipe: batch 256, SGD 0.06 momentum 0.9 wd 5e-4, cosine, T=0.5, head 128-512-128.
    "simclr": dict(backbone=RESNET, options={}, train=SGD),
    # SimCLRv2: SimCLR's views and optimiser; the paper's 3-layer head (128-128-128-128, BN) exported with its
    # middle layer; temperature 0.2 (sslbench default between SimCLR's CIFAR 0.5 and SimCLRv2's ImageNet 0.1).
    "simclrv2": dict(backbone=RESNET, options={}, train=SGD),
    # MoCo v2+ (solo-learn mocov2plus.yaml): T 0.2, head 2048-256, key momentum 0.99 (solo-learn 0.99 -> 0.999;
    # constant here), MoCo v2 views; shuffle BN over 8 chunks (bn_splits, the official CIFAR demo's). Queue 4096
    # instead of 32768: the queue must stay well below the 10,000 training images, or every image's own older keys
    # fill it as false negatives. SGD 0.06, wd 5e-4 (the official CIFAR demo's; solo-learn's lr 0.3, wd 1e-4 peaked
    # at epoch 5 and fell, see methods_c10_mini.md).
    "moco": dict(backbone=RESNET, options={"queue_size": 4096, "temperature": 0.2, "key_momentum": 0.99,
                                           "projection_hidden": 2048, "projection_dim": 256, "bn_splits": 8},
                 train=SGD),
    # BYOL (solo-learn byol.yaml): head 4096-256, predictor 4096, target momentum 0.99 -> 1 (cosine), asymmetric
    # CIFAR views: jitter 0.4/0.4/0.2/0.1, no blur, solarisation 0 / 0.2. LARS lr 1.0 -> SGD 0.12: sslbench averages
    # the loss's two directions where BYOL's paper sums them, so lr 0.12 is the paper's gradient step at SGD's 0.06
    # (34.09% against 33.13% at lr 0.06, methods_c10_mini.md). Changed for 585 steps: a constant lr and target
    # momentum 0.99 throughout (BYOL: cosine lr to 0, momentum to 1), as BYOL learns least at the end of any schedule:
    # +2.0 points after 15 epochs, mean of seeds 0 and 1 (methods_c10_mini.md). Batch 128 at lr 0.06 (lightly's
    # CIFAR-10 benchmark: batch 128, SGD 0.06, momentum 0.99 throughout): twice the steps in the same epochs, +1.5
    # points more on the mean of seeds 0 and 1 (methods_c10_mini.md).
    "byol": dict(backbone=RESNET, options={"blur_p": (0.0, 0.0), "solarize_p": (0.0, 0.2), "momentum_end": 0.99},
                 train=SGD_MORE_STEPS),
    # SwAV (solo-learn swav.yaml): 2 crops of 32 px (no multi-crop), head 2048-128 (3000 prototypes: see below),
    # T 0.1, 3 Sinkhorn iterations, prototypes frozen during the first epoch (solo-learn 2 of 1000). Epsilon 0.03
    # and no queue (solo-learn: 0.05, queue 3840 from epoch 50 of 1000): the official README's remedies for a loss
    # stuck at log K, which the first recipe was (methods_c10_mini.md). Crops of scale 0.2-1 (MoCo v2's; solo-learn
    # 0.08-1): +1.6 points after 15 epochs (methods_c10_mini.md). LARS lr 0.6 -> SGD 0.06. Batch 128 (lightly's
    # CIFAR batch, twice the steps), a constant lr and 512 prototypes (lightly's; a batch of 128 cannot spread over
    # 3000 in equal parts: each code spreads over ~23 of them): 39.35% / 38.83% / 40.71% for seeds 0 / 1 / 2,
    # against 34.12% for seed 0 at batch 256 with the cosine and 3000 prototypes (methods_c10_mini.md).
    "swav": dict(backbone=RESNET, options={"local_views": 0, "global_scale": (0.2, 1.0), "epsilon": 0.03, "prototypes": 512,
                                           "queue_size": 0, "freeze_prototypes_epochs": 1},
                 train=SGD_MORE_STEPS),
    # DINO on the ResNet, lightly's CIFAR-10 benchmark recipe (docs/source/getting_started/benchmarks/
    # cifar10_benchmark.py): batch 128, SGD 0.06, wd 5e-4; 2 crops of scale 0.4-1 (its DINOTransform's), no
    # multi-crop, no blur; a 2-layer head (2048 hidden, BN, GELU; bottleneck 256) to 2048 prototypes; teacher
    # momentum 0.99 throughout (paper 0.996 -> 1); teacher temperature 0.04 throughout (no warm-up to 0.07), student
    # 0.1, centre momentum 0.9; no gradient clipping, the last layer not frozen. Changed from lightly's for 15 epochs:
    # a constant lr (lightly's cosine over 200 epochs): 41.02% against 36.60% after 15 epochs (methods_c10_mini.md,
    # which also has the solo-learn-based recipe of session 11, +5.7).
    "dino": dict(backbone=RESNET, options={"local_views": 0, "global_scale": (0.4, 1.0), "hidden": 2048,
                                           "bottleneck": 256, "prototypes": 2048, "head_layers": 2,
                                           "teacher_temperature": 0.04, "warmup_teacher_epochs": 0.0,
                                           "momentum_start": 0.99, "momentum_end": 0.99, "clip_grad": 0.0,
                                           "freeze_last_layer_epochs": 0, "head_batch_norm": True,
                                           "blur_p": (0.0, 0.0, 0.0)},
                 train=SGD_MORE_STEPS),
    # DetCon_S (Henaff et al. 2021): SimCLR's views, head 512-128 and optimiser; T 0.1 (paper); 8 Felzenszwalb
    # segments drawn per image (scale 100, sigma 0.8, min size 20 px), computed once and cached under --out.
    "detcon_s": dict(backbone=RESNET, options={"temperature": 0.1}, train=SGD),
    # DetCon_B (the paper's and the released code's): BYOL's head, predictor, momentum and CIFAR views as the byol
    # recipe; DetCon_S's loss (T 0.1) between online predictions and target projections; FH masks as DetCon_S;
    # SGD 0.06 as DetCon_S. (--set objective=regression: BYOL's loss per mask, sslbench's first DetCon_B.)
    "detcon_b": dict(backbone=RESNET, options={"objective": "contrastive", "blur_p": (0.0, 0.0), "solarize_p": (0.0, 0.2)},
                     train=SGD),
    # MAE (He et al. 2022; solo-learn mae.yaml) on VIT_MINI with fixed sin-cos positions: mask 0.75, normalised
    # pixel targets, AdamW betas 0.9/0.95 wd 0.05; decoder 128 wide, 2 blocks, 4 heads (solo-learn: 512 / 8 / 16,
    # too slow for CPU), crops scale 0.2-1. lr 1.5e-3 with a 1-epoch warm-up: solo-learn's CIFAR lr 2e-4 (5% warm-up)
    # is tuned for 400 epochs and barely moved the kNN in 15 (generative_c10_mini.md). The encoder pools the mean of
    # its patch tokens (the method's default): MAE's loss is on the patch tokens only.
    "mae": dict(backbone={**VIT_MINI, "position_embedding": "sincos", "pool": "mean"}, options={},
                train={"batch_size": 256, "optimizer": "adamw", "lr": 1.5e-3, "betas": (0.9, 0.95), "weight_decay": 0.05,
                       "warmup_epochs": 1.0}),
    # BEiT with k-means tokens on VIT_MINI, drop path 0.1: 40% block-wise masking, AdamW betas 0.9/0.98 wd 0.05
    # (BEiT's ViT-B recipe). Tokens: a 512-entry k-means codebook of standardised 4x4 patches (``target=codes``; the
    # method's default is the colour palette per pixel, which stays below random init at this budget with any lr);
    # lr 1.5e-3 with 1 warm-up epoch, as MAE here (BEiT's scaled 1.875e-4 and warm-up 10/800 learn too slowly in 585
    # steps). generative_c10_mini.md has the colour-token rows and the sweeps.
    "beit_palette": dict(backbone={**VIT_MINI, "drop_path": 0.1}, options={"target": "codes"},
                         train={"batch_size": 256, "optimizer": "adamw", "lr": 1.5e-3, "betas": (0.9, 0.98), "weight_decay": 0.05,
                                "warmup_epochs": 1.0}),
    # iGPT (Chen et al. 2020) with its own transformer (no ResNet): 8x8 token grid (4x4-pixel cells; the 16x16 grid
    # trained at ~25 images/s on 2 cores, 100 minutes for 15 epochs), 512-colour k-means palette, autoregressive,
    # 4 layers x 128 wide x 4 heads (iGPT-S is 24 x 512: cut for CPU), read at the middle layer;
    # AdamW lr 1e-3 betas 0.9/0.95 no wd, one warm-up epoch (paper Sec. 3.3), batch 256 (paper 128).
    "igpt": dict(backbone={"backbone": "igpt"}, options={"grid": 8, "depth": 4, "width": 128, "heads": 4},
                 train={"batch_size": 256, "optimizer": "adamw", "lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.0,
                        "warmup_epochs": 1.0}),
    # DDAE: DDPM on the tiny U-Net (16/32/32 channels) at PyTorch's layer initialisation (init="pytorch", as
    # diffusers; the DDPM init with zeroed residual branches learns more slowly in short runs, speed.md section 5),
    # AdamW 2e-4 (batch 128 as the DDAE reference); readout t=11, mid block.
    "ddae": dict(backbone={**UNET_TINY, "unet": {**UNET_TINY["unet"], "init": "pytorch"}},
                 options={"readout_t": 11, "readout_block": "mid"},
                 train={**DDPM_TRAIN}),
    # DDAE-EDM (Karras et al. 2022 training of the same U-Net): ddae's optimiser and batch; EMA 0.9999 with
    # warm-up; readout at sigma 0.047 (DDPM's t = 11), mid block; P_mean -1.2, P_std 1.2, sigma_data 0.5.
    "ddae_edm": dict(backbone=UNET_TINY, options={"readout_block": "mid"},
                     train={**DDPM_TRAIN}),
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


def cpu_model() -> str:
    """The CPU for result files: its model name (``/proc/cpuinfo`` on Linux; ``platform`` elsewhere, which is vaguer)
    and the vector ISA PyTorch uses on it. The ISA tells machines of one name apart: two "AMD EPYC" machines of this
    project, one with native bf16 kernels and one AVX2 CPU without, differ several-fold in the same step."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}, {bf16})"


def raw_pixel_knn(train, test, probe: ProbeConfig) -> float:
    flat = lambda images: F.normalize(images.float().div(127.5).sub(1).flatten(1), dim=1)  # noqa: E731
    pred = knn_predict(flat(train.images), train.targets["class"], flat(test.images), 10, probe.knn_k, probe.knn_temperature)
    return (pred == test.targets["class"]).float().mean().item()


def random_init_encoder(method: str, trained: Encoder) -> Encoder:
    """The floor: the recipe's backbone at random initialisation (seed 0).

    iGPT reads palette tokens, so its floor is the trained run's architecture with the transformer re-initialised
    and the colour palette kept: the palette is a k-means tokenizer fitted on the training pixels before the first
    step, not learned weights, and without one the transformer has no input.
    """
    if isinstance(trained, ImageGPTEncoder):
        torch.manual_seed(0)
        encoder = build_encoder(trained.spec, pretrained=False)
        encoder.palette.load_state_dict(trained.palette.state_dict())
        return encoder.eval()
    return random_subject(RECIPES[method]["backbone"], "random", seed=0).encoder


def linear_top1(encoder: Encoder, train: ImageSet, test: ImageSet, probe: ProbeConfig) -> float:
    """Top-1 of a linear probe on the frozen encoder's pooled vector (``ClassificationTask``, protocol ``linear``)."""
    return ClassificationTask().evaluate(encoder, train, test, "linear", probe)["top1"]


def split_overrides(pairs: list[str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """``KEY=VALUE`` strings -> (training settings, method options, backbone keys); the engine type-checks the first
    two. A backbone key is written ``backbone.KEY`` (``backbone.pool=mean``, ``backbone.unet.init=pytorch``)."""
    from sslbench.methods import TrainConfig

    train_keys = TrainConfig.keys()
    train, options, backbone = {}, {}, {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: write KEY=VALUE, e.g. --set lr=0.1")
        if key in ("epochs", "seed"):
            raise SystemExit(f"--set {pair!r}: the protocol's {key} is set with --{key}, e.g. --{key} 1")
        if key.startswith("backbone."):
            backbone[key.removeprefix("backbone.")] = value
        else:
            (train if key in train_keys else options)[key] = value
    return train, options, backbone


def set_backbone_keys(spec: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """A copy of the backbone ``spec`` with dotted ``keys`` set; values are read as JSON where they parse
    (``0.5``, ``true``, ``[1, 2]``), else kept as strings (``mean``). A new key may be added (``build_encoder``
    rejects one its backbone does not take); a path through a key that is not a section is an error."""
    spec = copy.deepcopy(spec)
    for dotted, raw in keys.items():
        *parents, last = dotted.split(".")
        node = spec
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise SystemExit(f"--set backbone.{dotted}: the recipe's backbone has no section {'.'.join(parents)}; "
                             f"it is {json.dumps(spec)}")
        try:
            node[last] = json.loads(raw)
        except json.JSONDecodeError:
            node[last] = raw
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0,
                        help="Pretraining seed (the protocol's is 0; others measure seed noise). The floors stay at seed 0.")
    parser.add_argument("--knn-at", type=int, nargs="+", default=[5, 10, 15],
                        help="Epochs after which to score the kNN (those beyond --epochs are skipped; the last epoch always is).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", type=Path, default=Path("runs/c10_mini"))
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw numbers here.")
    parser.add_argument("--linear", action="store_true", help="Also train a linear probe on the final encoders.")
    parser.add_argument("--linear-epochs", type=int, default=ProbeConfig.epochs)
    parser.add_argument("--limit", type=int, default=None,
                        help="Smoke test, not the protocol: first N training and first N test images only.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Change the recipe: a training setting (lr, warmup_epochs, ...), a method option, or a "
                             "backbone key as backbone.KEY (backbone.pool=mean, backbone.unet.init=pytorch).")
    args = parser.parse_args()
    train_overrides, option_overrides, backbone_overrides = split_overrides(args.overrides)
    largest_batch = max(RECIPES[method]["train"]["batch_size"] for method in args.methods)
    if args.limit is not None and args.limit < largest_batch:
        parser.error(f"--limit {args.limit} leaves no full batch of {largest_batch} (batches drop the last partial one); "
                     f"use --limit {largest_batch} or more")
    torch.set_num_threads(args.threads)
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    train = load_dataset("cifar10", args.data_root, "train", limit=min(10_000, args.limit or 10_000))
    test = load_dataset("cifar10", args.data_root, "test", limit=args.limit)
    probe = ProbeConfig(seed=0, device=device, knn_k=200, knn_temperature=0.1, epochs=args.linear_epochs)
    protocol = "C10-mini" if args.limit is None else (
        f"NOT C10-mini: --limit {args.limit} smoke run ({len(train)} training images, {len(test)} test queries)")
    if args.limit is not None:
        print(f"WARNING: {protocol}", flush=True)
    report: dict = {"protocol": protocol, "command": "python " + " ".join(sys.argv),
                    "machine": f"{cpu_model()}, {args.threads} threads, "
                               f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}",
                    "versions": f"sslbench {sslbench.__version__}, torch {torch.__version__}, lightning {lightning.__version__}",
                    "precision": args.precision, "date": str(date.today()), "floors": {}, "methods": {}}
    if args.linear:
        report["linear_probe"] = (f"frozen pooled vector, linear layer, AdamW lr {probe.lr} wd {probe.weight_decay}, "
                                  f"batch {probe.batch_size}, {probe.epochs} epochs, no augmentation")
    report["floors"]["raw pixels"] = raw_pixel_knn(train, test, probe)
    print(json.dumps(report["floors"], indent=1), flush=True)
    for method in args.methods:
        recipe = RECIPES[method]
        recipe = {**recipe, "backbone": set_backbone_keys(recipe["backbone"], backbone_overrides),
                  "options": {**recipe["options"], **option_overrides}, "train": {**recipe["train"], **train_overrides}}
        monitor = KnnAtEpochs(sorted({e for e in args.knn_at if e <= args.epochs} | {args.epochs}), train, test, probe)
        out = args.out / method
        shutil.rmtree(out, ignore_errors=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = pretrain(method, train.images, RunConfig(out=out, accelerator=args.accelerator, devices="1", precision=args.precision, progress=False),
                          backbone=recipe["backbone"], options=recipe["options"], train={**recipe["train"], "epochs": args.epochs, "seed": args.seed},
                          callbacks=[monitor])
        trained, meta = load_encoder(result.out)
        report["methods"][method] = {  # training settings and options as the engine resolved them (parsed, with defaults)
            "backbone": recipe["backbone"], "train": meta["train"], "options": meta["options"],
            "seconds_per_epoch": sum(result.epoch_seconds) / len(result.epoch_seconds),
            "images_per_second": result.images_per_second, "peak_memory_mb": result.peak_memory_mb,
            "final_loss": result.final_loss, "knn_top1": monitor.scores, "wall_seconds": time.perf_counter() - start,
        }
        if args.linear:
            report["methods"][method]["linear_top1"] = linear_top1(trained, train, test, probe)
        print(json.dumps(report["methods"][method], indent=1), flush=True)
        floor = random_init_encoder(method, trained)
        floors = {f"random init ({method} backbone)": ClassificationTask().evaluate(floor, train, test, "knn", probe)["top1"]}
        if args.linear:
            floors[f"random init ({method} backbone), linear"] = linear_top1(floor, train, test, probe)
        report["floors"].update(floors)
        print(json.dumps(floors, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
