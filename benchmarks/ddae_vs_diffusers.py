"""DDAE on C10-mini data (../shared/BENCHMARKS.md), side by side: sslbench's DDPM U-Net against diffusers' ``UNet2DModel``.

Both sides train the same network, built after the same seed: 32/64/64 channels, one ResBlock per encoder level and
two per decoder level, single-head self-attention at the 8x8 level and in the middle block, GroupNorm 32, 1,113,955
parameters, every layer at PyTorch's default initialisation (sslbench's ``init="pytorch"``; its presets' DDPM
initialisation, with zeroed residual branches, learns more slowly in a 3-epoch run and read out 4 points lower here). sslbench runs its own training path (``sslbench.engine.pretrain``, method ``ddae``, backbone
``unet-small``); diffusers runs the plain loop its users write (``UNet2DModel``, ``EMAModel``). Both: CIFAR-10 training
images 0..9999 as uint8 in memory, the engine's batch order (``ShuffledBatches``), DDAE's horizontal flip (p 0.5), the
DDPM eps-prediction loss with T = 1000 linear betas (``sslbench.methods.ddae.ddpm_loss``: same timestep and noise
draw), batch 128, AdamW 2e-4 without weight decay, cosine over all steps, EMA 0.9999 with the (1 + n) / (10 + n)
warm-up, seed 0. Each side trains in its own worker process and the parent alternates their epochs (A B, B A, ...),
as ``speed_vs_lightly.py`` does, so a drift of the machine's speed hits both.

The EMA weights are read out afterwards with one readout code for both (``sslbench.diffusion_study.run_study``:
images scaled to [-1, 1], noised to level t with a seeded draw, a block's map averaged over space, weighted kNN
k = 200, T = 0.1 with the training images as the bank) over t in {11, 51, 101} and two blocks: ``mid`` (stride 4)
and ``up1.1`` (the last decoder ResBlock at stride 2; diffusers' ``up_blocks[1].resnets[1]``). sslbench's U-Net
returns the blocks and stops after the last one it needs; diffusers' blocks are read with forward hooks over a full
forward pass, as DDAE's official code reads its U-Net. Each model at a random init drawn with the run's seed is scored
at its best cell.

``--unet small-lean`` trains sslbench's ``unet-small-lean`` instead: the same channels, attention and encoder, and a
lean decoder (one ResBlock per level, no convolution after upsampling; 754,531 parameters). Its second block is then
``up1.0``, the last decoder ResBlock at stride 2. ``--unet small-fast`` trains ``unet-small-fast``: ``unet-small-lean``
whose decoder ResBlocks read their concatenated skip with a 1x1 convolution (598,883 parameters).

    python benchmarks/ddae_vs_diffusers.py --data-root DIR --report benchmarks/results/ddae_speed.md --json FILE
    python benchmarks/ddae_vs_diffusers.py --data-root DIR --report FILE --unet small-lean   # sslbench's lean decoder
    python benchmarks/ddae_vs_diffusers.py --data-root DIR --report FILE --unet small-fast   # ... mixing skips 1x1
    python benchmarks/ddae_vs_diffusers.py --data-root DIR --report FILE --unet small-fast --compile   # both compiled
    python benchmarks/ddae_vs_diffusers.py --data-root DIR --report /tmp/smoke.md --limit 256 --epochs 1 --queries 256

DIR holds ``cifar-10-batches-py/`` (``python ../shared/data/materialize.py DIR cifar10``). ``--precision`` is
sslbench's engine precision. Its default, ``auto``, takes ``bf16-mixed`` (bf16 autocast, the engine's GPU default) where
oneDNN has bf16 kernels for the CPU and ``32-true`` where it has none (an AVX2 CPU runs bf16 convolutions in PyTorch's
slow reference path). ``--diffusers-precision bf16-mixed`` gives diffusers' loop the same autocast for a like-for-like
check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslbench.backbones import backbone_spec, build_encoder
from sslbench.backbones.diffusion import DDPMSchedule, DiffusionEncoder
from sslbench.diffusion_study import StudyCell, run_study
from sslbench.engine import cpu_has_native_bf16, reuse_freed_cpu_memory
from sslbench.methods.ddae import DDAEOptions, ddpm_loss, random_hflip
from sslbench.tasks import ProbeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from c10_mini import DDPM_TRAIN, cpu_model, raw_pixel_knn  # noqa: E402  (benchmarks/ is a folder of scripts)
from speed_vs_lightly import EpochReport, Settings, numpy_state, run_side_by_side, sslbench_worker, training_images  # noqa: E402

LIBRARIES = ("sslbench", "diffusers")
LEVELS = (11, 51, 101)
BLOCKS = ("mid", "up1.1")
DIFFUSERS_BLOCKS = {"mid": ("mid_block", 4), "up1.1": ("up_blocks.1.resnets.1", 2)}
"""sslbench block name -> (the diffusers module with the same output, its stride)."""
VARIANTS = {"small-p2": ("small", {"patch_size": 2, "attention_resolutions": [8]}),
            "small-fast-notop": ("small-fast", {"top_decoder_block": False}),
            "small-pointwise": ("small-fast", {"decoder_kernel2": 1, "upsample_project": True})}
"""U-Nets this benchmark builds from a preset with other settings: ``small-p2`` is ``unet-small`` on 2x2 pixel patches
(``UNetConfig.patch_size``; every level at half the resolution, attention still at the last level), a quarter of the
multiply-adds. It trains 4.7x faster than diffusers' model but reads out 3.5 points lower (``speed.md`` section 8),
so it is no preset. ``small-fast-notop`` is ``unet-small-fast`` without its 32x32 decoder ResBlock (the output head
reads the upsampled map and the 32x32 skip): 76.2M multiply-adds instead of 90.2M, but its middle block read out
29.35% against small-fast's 33.80% in ``ddae_variant.py`` runs (section 9). ``small-pointwise`` is ``unet-small-fast``
whose decoder is position-wise (both convolutions of its ResBlocks 1x1) and whose 16x16 map is projected to 32
channels before upsampling (``UNetConfig.decoder_kernel2``, ``upsample_project``), 69.7M multiply-adds: it trained at
2.67x diffusers' images/s but read out 32.23% against 33.56% (``speed.md`` section 10), so it is no preset."""
UNETS = ("small", "small-lean", "small-fast", *VARIANTS)
"""sslbench's U-Nets this benchmark trains: ``small`` is diffusers' network layer for layer; ``small-lean`` has
the same channels and a lean decoder (one ResBlock per level, no convolution after upsampling); ``small-fast`` is
``small-lean`` whose decoder ResBlocks read their concatenated skip with a 1x1 convolution; see ``VARIANTS``."""
DIFFERENCES = {
    "small-lean": ["diffusers' decoder has 2 ResBlocks per level and a conv after each upsampling, sslbench's",
                   "`unet-small-lean` 1 and none."],
    "small-fast": ["diffusers' decoder has 2 ResBlocks per level and a conv after each upsampling, sslbench's",
                   "`unet-small-fast` 1 and none, and the first conv of each of its decoder ResBlocks (the one",
                   "that reads the concatenated skip) is 1x1 where diffusers' is 3x3."],
    "small-pointwise": ["diffusers' decoder has 2 ResBlocks per level and a conv after each upsampling, sslbench's",
                        "`small-pointwise` 1 ResBlock with two 1x1 convs where diffusers' are 3x3, and a 1x1 conv that",
                        "maps the 16x16 map to 32 channels before upsampling it into the 32x32 level."],
    "small-p2": ["sslbench's `unet-small-p2` folds 2x2 pixel patches into channels before its first conv, so its",
                 "levels run at 16x16, 8x8 and 4x4 (attention at 4x4) where diffusers' run at 32x32, 16x16 and 8x8."],
}
"""How each U-Net other than ``small`` differs from diffusers' model, for the report."""


def recipe(unet: str = "small") -> dict[str, Any]:
    """sslbench's side; the diffusers loop reads its batch size and optimiser settings from it too."""
    preset, changes = VARIANTS.get(unet, (unet, {}))
    spec = backbone_spec(f"unet-{preset}")
    return dict(backbone={**spec, "unet": {**spec["unet"], **changes, "init": "pytorch"}}, options={"readout_t": LEVELS[0], "readout_block": "mid"},
                train={**DDPM_TRAIN})


RECIPE = recipe()


def readout_blocks(library: str, backbone: dict[str, Any]) -> tuple[str, ...]:
    """The two blocks read: ``mid`` and the last decoder ResBlock at stride 2 (``up1.1`` in diffusers' layout)."""
    if library == "diffusers":
        return BLOCKS
    unet = build_encoder(backbone).unet
    return ("mid", [name for name in unet.block_names() if name.startswith("up") and not name.endswith(".up")
                    and unet.block_stride(name) == 2][-1])


def diffusers_unet() -> nn.Module:
    """``UNet2DModel`` in the layout of sslbench's ``unet-small`` preset (same channels, blocks per level, attention
    resolution, GroupNorm groups and single attention head; ``attention_head_dim=None`` = one head of all channels,
    as DDPM's AttnBlock). Its parameter count equals the preset's (1,113,955)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32, attention_head_dim=None)


@dataclass
class SideBySideSettings(Settings):
    """``Settings`` plus the precision of diffusers' loop (``32-true`` or ``bf16-mixed``)."""

    diffusers_precision: str = "32-true"


def engine_precision(choice: str) -> str:
    """``--precision``: ``auto`` is bf16 autocast only where the CPU has native bf16 kernels (else it slows the step)."""
    if choice != "auto":
        return choice
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU for ``bf16-mixed`` (what Lightning's ``bf16-mixed`` does there), else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()


def diffusers_worker(settings: SideBySideSettings, conn) -> None:
    """The same DDPM training written the way diffusers' examples write it, paused between epochs until the parent says go."""
    from diffusers.training_utils import EMAModel

    from sslbench.engine import ShuffledBatches

    torch.set_num_threads(settings.threads)
    reuse_freed_cpu_memory()  # as sslbench's engine does on the CPU: the allocator is not what is compared
    images = training_images(settings).images
    train = settings.recipe["train"]
    torch.manual_seed(settings.seed)  # the engine seeds before it builds the U-Net, too
    model = diffusers_unet()
    if settings.compile:
        model.compile()
    ema = EMAModel(model.parameters(), decay=DDAEOptions.ema_decay)  # its default warm-up is DDAE's (1 + n) / (10 + n)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    batches = ShuffledBatches(images, train["batch_size"], seed=settings.seed)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * len(batches))
    schedule = DDPMSchedule()
    generator = torch.Generator().manual_seed(settings.seed)

    def predict_noise(noised: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return model(noised, timesteps).sample

    model.train()
    for epoch in range(1, settings.epochs + 1):
        conn.recv()
        batches.set_epoch(epoch - 1)
        start, seen, loss_sum = time.perf_counter(), 0, 0.0
        for index in range(len(batches)):
            x = batches[index].float() / 127.5 - 1.0
            x = random_hflip(x, generator)
            with autocast(settings.diffusers_precision):
                loss = ddpm_loss(predict_noise, schedule, x, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            ema.step(model.parameters())
            seen += len(x)
            loss_sum += loss.item() * len(x)
        seconds = time.perf_counter() - start
        state = None
        if epoch == settings.epochs:
            ema.copy_to(model.parameters())  # training is over: the exported weights are the EMA ones, as DDAE's
            state = numpy_state(model)
        conn.send(EpochReport(seconds, seen, loss_sum / seen, state))


WORKERS = {"sslbench": sslbench_worker, "diffusers": diffusers_worker}


# --- readout -----------------------------------------------------------------------------------------
class HookedBlocks(nn.Module):
    """diffusers' U-Net behind the two calls sslbench's readout makes of a U-Net (``block_stride`` and
    ``forward_features``); the blocks are caught with forward hooks during a full forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def block_stride(self, name: str) -> int:
        return DIFFUSERS_BLOCKS[name][1]

    def forward_features(self, x: torch.Tensor, t: torch.Tensor, blocks: list[str]) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}

        def keep(name: str):
            return lambda module, inputs, output: outputs.__setitem__(name, output)

        handles = [self.model.get_submodule(DIFFUSERS_BLOCKS[name][0]).register_forward_hook(keep(name)) for name in blocks]
        try:
            self.model(x, t)
        finally:
            for handle in handles:
                handle.remove()
        return {name: outputs[name] for name in blocks}


class DiffusersReadout(nn.Module):
    """diffusers' U-Net read at level ``t`` by sslbench's own ``DiffusionEncoder.read_blocks`` (the same scaling,
    seeded noise draw and timestep), so the two models differ only in the network. ``run_study`` takes it as it
    takes a ``DiffusionEncoder``."""

    read_blocks = DiffusionEncoder.read_blocks

    def __init__(self, model: nn.Module, t: int = LEVELS[0], noise_seed: int = 0):
        super().__init__()
        self.unet = HookedBlocks(model)
        self.schedule = DDPMSchedule()
        self.t, self.noise_seed = t, noise_seed


def readout_encoder(library: str, state: dict[str, Any] | None, backbone: dict[str, Any] = RECIPE["backbone"],
                    seed: int = 0) -> nn.Module:
    """The library's U-Net with the given weights (numpy arrays), or at a random init drawn with ``seed`` when
    ``state`` is None; ``backbone`` is sslbench's."""
    torch.manual_seed(seed)
    encoder = build_encoder(backbone) if library == "sslbench" else DiffusersReadout(diffusers_unet())
    if state is not None:
        target = encoder if library == "sslbench" else encoder.unet.model
        target.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()})
    return encoder.eval()


@dataclass
class Readout:
    """A model's kNN grid, its best cell, the same cell at random init, and the feature-extraction speed."""

    cells: list[StudyCell]
    best: StudyCell
    extraction_images_per_second: float
    random_init_top1: float


def read_out(library: str, state: dict[str, Any], train, test, probe: ProbeConfig, backbone: dict[str, Any], seed: int) -> Readout:
    """The grid over ``LEVELS`` x ``readout_blocks``; extraction time is the study's time minus its kNN votes. The
    random-init floor is drawn with the run's ``seed``, so each seed's run is compared with an init of its own."""
    start = time.perf_counter()
    blocks = list(readout_blocks(library, backbone))
    cells = run_study(readout_encoder(library, state, backbone), train, test, list(LEVELS), blocks, "knn", probe)
    extraction_seconds = time.perf_counter() - start - sum(cell.seconds for cell in cells)
    best = max(cells, key=lambda cell: cell.top1)
    random_init = run_study(readout_encoder(library, None, backbone, seed), train, test, [best.t], [best.block], "knn", probe)[0].top1
    return Readout(cells, best, (len(train) + len(test)) * len(LEVELS) / extraction_seconds, random_init)


# --- report ------------------------------------------------------------------------------------------
def parameter_count(library: str, backbone: dict[str, Any]) -> int:
    model = readout_encoder(library, None, backbone)
    return sum(p.numel() for p in model.parameters())


def markdown_report(report: dict[str, Any]) -> str:
    ours, theirs = (report["models"][name] for name in LIBRARIES)

    def row(label: str, key: str, fmt: str, ratio: bool = True) -> str:
        cells = [format(ours[key], fmt), format(theirs[key], fmt)]
        return f"| {label} | {cells[0]} | {cells[1]} | " + (f"{ours[key] / theirs[key]:.2f}x |" if ratio else "|")

    def grid(name: str) -> list[str]:
        model = report["models"][name]
        values = {(cell["t"], cell["block"]): cell["top1"] for cell in model["grid"]}
        best = (model["best"]["t"], model["best"]["block"])
        lines = [f"| {name}: block \\ t | " + " | ".join(str(t) for t in LEVELS) + " |", "|---" * (len(LEVELS) + 1) + "|"]
        for block in model["blocks"]:
            lines.append(f"| {block} | " + " | ".join(f"{values[(t, block)]:.2%}" + ("*" if (t, block) == best else "")
                                                      for t in LEVELS) + " |")
        return lines

    best_difference = 100 * (ours["best"]["top1"] - theirs["best"]["top1"])
    lines = [
        "# DDAE speed: sslbench's U-Net vs diffusers' UNet2DModel (C10-mini data, ../shared/BENCHMARKS.md)", "",
        *([] if report["protocol"] == "C10-mini DDAE" else [f"**{report['protocol']}**", ""]),
        f"- Machine: {report['machine']}.", f"- Versions: {report['versions']}.",
        f"- Date: {report['date']}. Command: `{report['command']}`",
        f"- Precision: sslbench `{ours['precision']}`, diffusers `{theirs['precision']}`"
        + (" (bf16 autocast is the engine's GPU default; on the CPU sslbench takes it from `--precision`)."
           if ours["precision"] != theirs["precision"] else "."),
        *([f"- Seed {report['seed']} on both sides (the protocol's is 0)."] if report.get("seed") else []),
        *(["- Both U-Nets compiled with `torch.compile` (sslbench: the engine's `--compile`); compilation is timed in epoch 1."]
          if report.get("compile") else []),
        *(["- Both sides keep freed memory for reuse (`sslbench.engine.reuse_freed_cpu_memory`, glibc's malloc settings),",
           "  as sslbench's engine does on the CPU."] if report.get("reuse_freed_memory") else []),
        *(["- Same network on both sides (32/64/64 channels, 1 ResBlock per encoder level, 2 per decoder level, one-head",
            "  attention at 8x8 and in the middle block, GroupNorm 32), same seed, images, batch order, flip, DDPM loss"]
          if report["unet"] == "small" else
          ["- Same channels on both sides (32/64/64, 1 ResBlock per encoder level, one-head attention at the last level",
           "  and in the middle block, GroupNorm 32); " + DIFFERENCES[report["unet"]][0],
           *("  " + line for line in DIFFERENCES[report["unet"]][1:-1]),
           "  " + DIFFERENCES[report["unet"]][-1] + " Same seed, images, batch order, flip, DDPM loss"]),
        "  (T = 1000 linear betas), batch 128, AdamW 2e-4, cosine, EMA 0.9999 with warm-up; epochs alternate A B, B A.",
        "- Readout of the EMA weights, one code for both: noise level t, block map averaged over space, weighted kNN",
        f"  (k = 200, T = 0.1), bank = {report['bank']} training images, {report['queries']} test queries; sslbench stops",
        "  after the last block it reads, diffusers' blocks come from forward hooks over a full pass (DDAE's way).",
        "", "| | sslbench | diffusers | ratio (sslbench / diffusers) |", "|---|---|---|---|",
        row("parameters", "parameters", ","),
        row("training images/s", "images_per_second", ".1f"),
        row("seconds per epoch (readout excluded)", "seconds_per_epoch", ".1f"),
        row("feature extraction images/s", "extraction_images_per_second", ".1f"),
        row("peak RSS (worker process)", "peak_rss_mb", ".0f"),
        row("final loss (last epoch mean)", "final_loss", ".4f", ratio=False),
        f"| best readout | {ours['best']['top1']:.2%} (t = {ours['best']['t']}, {ours['best']['block']}) | "
        f"{theirs['best']['top1']:.2%} (t = {theirs['best']['t']}, {theirs['best']['block']}) | {best_difference:+.1f} points |",
        f"| same cell at random init | {ours['random_init_top1']:.2%} | {theirs['random_init_top1']:.2%} | |",
        "", f"Raw pixels (same kNN): {report['floors']['raw pixels']:.2%}.", "",
        *grid("sslbench"), "", *grid("diffusers"), "",
        "Seconds per epoch, in order: " + "; ".join(
            f"{name} " + ", ".join(f"{s:.1f}" for s in report["models"][name]["epoch_seconds"]) for name in LIBRARIES) + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--report", required=True, type=Path, help="Markdown report to write.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw numbers here.")
    parser.add_argument("--epochs", type=int, default=3, help="3, as the DDAE C10-mini reference.")
    parser.add_argument("--limit", type=int, default=None, help="Smoke runs: train on (and use as the bank) only N images.")
    parser.add_argument("--queries", type=int, default=None, help="Score on the first N test images (default: all 10,000).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16-mixed", "32-true"),
                        help="sslbench's engine precision; auto: bf16-mixed where the CPU has native bf16 kernels, else 32-true.")
    parser.add_argument("--diffusers-precision", default="32-true", choices=("bf16-mixed", "32-true"))
    parser.add_argument("--out", type=Path, default=Path("runs/ddae_vs_diffusers"))
    parser.add_argument("--unet", default="small", choices=UNETS, help="sslbench's U-Net preset (channels 32/64/64 in both).")
    parser.add_argument("--seed", type=int, default=0, help="Both sides' seed (the protocol's is 0; others measure seed noise).")
    parser.add_argument("--compile", action="store_true", help="torch.compile both U-Nets (sslbench: the engine's --compile).")
    args = parser.parse_args()
    sslbench_recipe = recipe(args.unet)
    batch_size = sslbench_recipe["train"]["batch_size"]
    if args.limit is not None and args.limit < batch_size:
        parser.error(f"--limit {args.limit} leaves no full batch of {batch_size}; use --limit {batch_size} or more")

    import diffusers
    import lightning

    import sslbench
    from sslbench.data import load_dataset

    torch.set_num_threads(args.threads)
    args.precision = engine_precision(args.precision)
    settings = SideBySideSettings(args.data_root, args.epochs, args.limit, args.threads, args.out, method="ddae",
                                  recipe=sslbench_recipe, precision=args.precision, knn_at=(), diffusers_precision=args.diffusers_precision,
                                  compile=args.compile, seed=args.seed)
    train = training_images(settings)
    test = load_dataset("cifar10", args.data_root, "test", limit=args.queries)
    probe = ProbeConfig(seed=0, device="cpu", knn_k=200, knn_temperature=0.1)
    readouts: dict[str, Readout] = {}

    def evaluate(name: str, state: dict[str, Any]) -> float:
        readouts[name] = read_out(name, state, train, test, probe, sslbench_recipe["backbone"], args.seed)
        return readouts[name].best.top1

    runs = run_side_by_side(settings, evaluate, WORKERS)
    protocol = "C10-mini DDAE" if args.limit is None and args.queries is None and args.epochs == 3 else (
        f"Smoke run, not the protocol: {args.epochs} epoch(s), {len(train)} training images, {len(test)} test queries")
    report: dict[str, Any] = {
        "protocol": protocol, "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores visible, {args.threads} torch threads per side",
        "versions": f"sslbench {sslbench.__version__}, diffusers {diffusers.__version__}, torch {torch.__version__}, "
                    f"lightning {lightning.__version__}, Python {platform.python_version()}",
        "date": str(date.today()), "unet": args.unet, "compile": args.compile, "seed": args.seed,
        "bank": len(train), "queries": len(test),
        "reuse_freed_memory": reuse_freed_cpu_memory(),  # the workers' setting (each process applies its own)
        "floors": {"raw pixels": raw_pixel_knn(train, test, probe)}, "models": {},
    }
    for name in LIBRARIES:
        run, readout = runs[name], readouts[name]
        report["models"][name] = {
            "parameters": parameter_count(name, sslbench_recipe["backbone"]),
            "blocks": list(dict.fromkeys(cell.block for cell in readout.cells)),  # the grid's rows, in reading order
            "precision": args.precision if name == "sslbench" else args.diffusers_precision,
            "epoch_seconds": run.epoch_seconds, "images_per_second": run.images_per_second,
            "seconds_per_epoch": run.seconds_per_epoch, "peak_rss_mb": run.peak_rss_mb, "losses": run.losses,
            "final_loss": run.losses[-1], "extraction_images_per_second": readout.extraction_images_per_second,
            "grid": [asdict(cell) for cell in readout.cells], "best": asdict(readout.best),
            "random_init_top1": readout.random_init_top1,
        }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(markdown_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(args.report.read_text(), flush=True)


if __name__ == "__main__":
    main()
