"""The ``sslbench`` command line: demo, pretrain, eval, bench, results.

Every user mistake ends in one line on stderr that names the thing and the fix, and exit code 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from sslbench.errors import ConfigError, SslbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Self-supervised encoders (generative and contrastive) compared on four task types.")

TASK_CHOICES = "classification, counting, depth, segmentation"
# Typer's parse errors (a click UsageError, vendored inside typer in recent versions).
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _quiet() -> None:
    """Keep the terminal for our progress and tables: silence library banners and deprecation noise."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _positive(name: str, value: Optional[int | float]) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"option --{name}={value} is out of range; use a positive value")


@app.command()
def pretrain(
    method: str = typer.Option(..., help="Method: simclr, ddae, ... (see 'sslbench methods')."),
    data: str = typer.Option("scenes", help="Dataset name: scenes (built in), cifar10, cifar100, folder, pets, clevr, nyu."),
    data_root: Optional[Path] = typer.Option(None, help="Folder holding the dataset in its official layout (not needed for scenes)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone: resnet18, resnet34, resnet50, unet-tiny, unet-small, unet-small-lean (unet-small with a lean decoder), unet-small-fast (unet-small-lean mixing skips with 1x1 convs), unet-ddpm_cifar10 (the 35.7M-parameter DDPM CIFAR-10 U-Net), vit-nano, vit-tiny, vit-small (vit-tiny/8: patch 8) (default: the method's)."),
    width: float = typer.Option(1.0, help="ResNet width multiplier (0.25 = C10-mini's 16/32/64/128 channels)."),
    image_size: Optional[int] = typer.Option(None, help="Resize images to this square size (default: the dataset's; 32 for scenes)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default: the method's)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size per process (default: the method's)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: the method's)."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N training images (official order)."),
    out: Path = typer.Option(Path("runs/pretrain"), help="Output folder: last.ckpt, encoder.safetensors, encoder.json."),
    seed: int = typer.Option(0, help="Random seed (data order, views, initialisation)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last.ckpt."),
    set_: list[str] = typer.Option([], "--set", help="Method or training option KEY=VALUE (repeatable), e.g. --set temperature=0.2."),
    config: Optional[Path] = typer.Option(None, help="YAML file of method/training options (keys as for --set)."),
    devices: str = typer.Option("auto", help="Lightning devices: auto, 1, 4, ..."),
    strategy: str = typer.Option("auto", help="Lightning strategy: auto, ddp, fsdp, ..."),
    num_nodes: int = typer.Option(1, help="Number of nodes (multi-node DDP)."),
    precision: Optional[str] = typer.Option(None, help="Lightning precision (default: bf16-mixed on GPU, 32-true on CPU)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder."),
    data_on_device: bool = typer.Option(True, "--data-on-device/--data-on-host",
                                        help="On a GPU, keep the uint8 images in GPU memory when they fit in a quarter of it."),
    stream: bool = typer.Option(False, "--stream", help="Decode a --data folder from disk batch by batch in loader workers "
                                "instead of loading it into memory, for folders larger than RAM (needs --image-size; "
                                "every epoch decodes the images again)."),
    loader_workers: Optional[int] = typer.Option(None, help="Processes decoding a --stream folder (default: the CPU "
                                                 "cores, at most 8); 0 decodes in the training process."),
) -> None:
    """Pretrain an encoder with a self-supervised method and export it."""
    from sslbench.backbones import backbone_spec
    from sslbench.config import load_yaml, parse_pairs
    from sslbench.data import dataset_entry, load_dataset, stream_dataset
    from sslbench.engine import RunConfig, pretrain as run_pretrain
    from sslbench.methods import METHODS, TrainConfig

    _positive("epochs", epochs)
    _positive("batch-size", batch_size)
    _positive("lr", lr)
    _positive("limit", limit)
    _positive("image-size", image_size)
    _positive("width", width)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; use one of {', '.join(sorted(METHODS))}")
    overrides = {**(load_yaml(config) if config else {}), **parse_pairs(set_)}
    train_keys = TrainConfig.keys()
    train = {k: v for k, v in overrides.items() if k in train_keys}
    options = {k: v for k, v in overrides.items() if k not in train_keys}
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if value is not None:
            train[key] = value
    train["seed"] = seed
    if loader_workers is not None and loader_workers < 0:
        raise ConfigError(f"option --loader-workers={loader_workers} is out of range; use 0 (decode in the training process) or more")
    if loader_workers is not None and not stream:
        raise ConfigError("--loader-workers applies to --stream only: data in memory is gathered in the training process; "
                          "drop --loader-workers or add --stream")
    entry = dataset_entry(data)
    if stream:
        images, masks = stream_dataset(data, data_root, entry.train_split, image_size, limit), None
        size = images.image_size
    else:
        dataset = load_dataset(data, data_root, entry.train_split, image_size=image_size, limit=limit)
        images, size = dataset.images, dataset.image_size[1]
        # Mask-based methods (DetCon) get the ground-truth segmentation when the dataset has one.
        masks = dataset.targets.get("mask") if METHODS[method].needs_masks else None
    spec = backbone_spec(backbone, width, size) if backbone else None
    result = run_pretrain(method, images, RunConfig(out=out, devices=devices, strategy=strategy, num_nodes=num_nodes,
                                                    precision=precision, resume=resume, compile=compile,
                                                    data_on_device=data_on_device,
                                                    **({} if loader_workers is None else {"loader_workers": loader_workers})),
                          backbone=spec, options=options, train=train, info={"data": data, "train_images": len(images)},
                          masks=masks)
    typer.echo(f"{method}: {len(result.epoch_seconds)} epochs this run, {result.images_per_second:.0f} images/s, "
               f"final loss {result.final_loss:.4f}; encoder exported to {out}")


@app.command("eval")
def eval_(
    task: str = typer.Option(..., help=f"Task: {TASK_CHOICES}."),
    encoder: Optional[str] = typer.Option(None, help="Encoder to evaluate: timm:NAME (published weights; timm:NAME?pretrained=false "
                                          "for random init), random:BACKBONE, or the output folder of 'sslbench pretrain'."),
    checkpoint: Optional[Path] = typer.Option(None, help="Output folder of 'sslbench pretrain' (holds encoder.safetensors + encoder.json); "
                                              "the same as --encoder PATH."),
    random: bool = typer.Option(False, "--random", help="Evaluate a randomly initialised --backbone; the same as --encoder random:BACKBONE."),
    backbone: str = typer.Option("resnet18", help="Backbone for --random (see 'sslbench pretrain --help')."),
    width: float = typer.Option(1.0, help="ResNet width multiplier for --random and --encoder random:BACKBONE."),
    protocol: Optional[str] = typer.Option(None, help="classification: knn|linear|finetune|linear-1pct|linear-10pct|finetune-1pct|"
                                           "finetune-10pct|distill-1pct|distill-10pct (SimCLRv2: few-label teacher distilled on all images); "
                                           "counting: linear|conv|finetune; depth: probe|finetune (U-Net decoder); "
                                           "segmentation: probe|finetune (DeepLabV3+)."),
    data: str = typer.Option("scenes", help="Dataset name (see 'sslbench pretrain --help')."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset folder in its official layout."),
    image_size: Optional[int] = typer.Option(None, help="Resize images to this square size."),
    train_limit: Optional[int] = typer.Option(None, help="Use only the first N training images."),
    test_limit: Optional[int] = typer.Option(None, help="Use only the first N test images."),
    out: Path = typer.Option(Path("runs/eval"), help="Folder whose results.jsonl receives the rows."),
    seed: int = typer.Option(0, help="Seed of the probe (and of the random encoder)."),
    probe_epochs: int = typer.Option(30, help="Epochs of head training, and of fine-tuning for finetune protocols (the same for every encoder)."),
    device: Optional[str] = typer.Option(None, help="Device for the probe: cpu or cuda (default: cuda if available)."),
) -> None:
    """Evaluate an encoder (timm model, checkpoint or random init) on one task and append the results."""
    from sslbench.evaluation import check_encoder_reference, check_task, evaluate, load_splits
    from sslbench.tasks import ProbeConfig, default_device

    _positive("probe-epochs", probe_epochs)
    _positive("train-limit", train_limit)
    _positive("test-limit", test_limit)
    _positive("image-size", image_size)
    protocol = check_task(task, protocol, data)
    if (encoder is not None) + (checkpoint is not None) + random != 1:
        raise ConfigError("give exactly one of --encoder (timm:NAME, random:BACKBONE or PATH), --checkpoint PATH or --random")
    if checkpoint is None:
        check_encoder_reference(encoder if encoder is not None else f"random:{backbone}")
    train, test = load_splits(data, data_root, image_size, train_limit, test_limit)
    subject = _subject(encoder, checkpoint, random, backbone, width, seed, train.image_size[0])
    metrics = evaluate(subject, task, protocol, data, train, test,
                       ProbeConfig(epochs=probe_epochs, seed=seed, device=default_device(device)), out)
    typer.echo(f"{subject.method} {task}/{protocol} on {data}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def _subject(encoder: Optional[str], checkpoint: Optional[Path], random: bool, backbone: str, width: float, seed: int,
             image_size: int):
    from sslbench.evaluation import checkpoint_subject, encoder_subject

    if checkpoint is not None:
        return checkpoint_subject(checkpoint)
    return encoder_subject(encoder if encoder is not None else f"random:{backbone}", seed, image_size, width)


@app.command("probe-diffusion")
def probe_diffusion(
    checkpoint: Path = typer.Option(..., help="Output folder of 'sslbench pretrain --method ddae' (or ddae_edm)."),
    timesteps: Optional[str] = typer.Option(None, help="DDPM readout levels, comma-separated (0 = clean; default 0,11,50,100)."),
    sigmas: Optional[str] = typer.Option(None, help="EDM readout noise levels for ddae_edm models (default: those of the default timesteps)."),
    no_noise: bool = typer.Option(False, "--no-noise", help="Read the clean image only (t = 0): the study's no-noise ablation."),
    blocks: Optional[str] = typer.Option(None, help="U-Net blocks, comma-separated, e.g. mid,up2.0,up1.1 (default: all)."),
    weights: str = typer.Option("ema", help="ema (the exported weights) or raw (the training weights in last.ckpt)."),
    head: str = typer.Option("linear", help="linear (on the pooled block), conv (a small conv head on the block's map) or knn (no training)."),
    optimizer: str = typer.Option("adamw", help="Optimiser of the probe heads: adamw or adam."),
    data: str = typer.Option("scenes", help="Dataset with class labels (see 'sslbench pretrain --help')."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset folder in its official layout."),
    image_size: Optional[int] = typer.Option(None, help="Resize images to this square size."),
    train_limit: Optional[int] = typer.Option(None, help="Use only the first N training images."),
    test_limit: Optional[int] = typer.Option(None, help="Use only the first N test images."),
    out: Path = typer.Option(Path("runs/eval"), help="Folder whose results.jsonl receives one row per (t, block)."),
    seed: int = typer.Option(0, help="Seed of the probes."),
    probe_epochs: int = typer.Option(30, help="Epochs of head training per cell."),
    device: Optional[str] = typer.Option(None, help="Device: cpu or cuda (default: cuda if available)."),
) -> None:
    """DDAE's readout study: one probe per (noise level t, U-Net block), one U-Net pass per t; prints the grid."""
    from sslbench.diffusion_study import check_head, load_diffusion_encoder, print_grid, run_study, study_levels, study_rows
    from sslbench.evaluation import check_task, load_splits
    from sslbench.results import append_rows
    from sslbench.tasks import ProbeConfig, default_device

    _positive("probe-epochs", probe_epochs)
    _positive("train-limit", train_limit)
    _positive("test-limit", test_limit)
    _positive("image-size", image_size)
    check_task("classification", "linear", data)
    check_head(head)
    config = ProbeConfig(epochs=probe_epochs, seed=seed, device=default_device(device), optimizer=optimizer)
    encoder, meta = load_diffusion_encoder(checkpoint, weights)
    levels = study_levels(encoder, timesteps, sigmas, no_noise)
    block_names = [b.strip() for b in blocks.split(",") if b.strip()] if blocks else encoder.unet.block_names()
    train, test = load_splits(data, data_root, image_size, train_limit, test_limit)
    cells = run_study(encoder, train, test, levels, block_names, head, config)
    common = {"checkpoint": str(checkpoint), "dataset": data, "task": "classification", "protocol": head, "seed": seed,
              "epochs": int(meta.get("epochs", 0)), "train_size": len(train), "test_size": len(test),
              "optimizer": optimizer, "formulation": encoder.schedule.spec()["formulation"], "study": "probe-diffusion"}
    append_rows(out, study_rows(cells, common, meta.get("method", "unknown"), weights))
    print_grid(cells, title=f"{meta.get('method', 'unknown')} {weights} {head} top-1 (* best)")


@app.command()
def results(path: Path = typer.Argument(Path("runs/demo"), help="A results.jsonl file or the folder holding it.")) -> None:
    """Print the method x task table of a results file."""
    from sslbench.results import load_rows, render_table, results_path

    render_table(load_rows(path), title=str(results_path(path)))


@app.command()
def bench(config: Path = typer.Argument(..., help="YAML file: out, datasets, encoders, tasks, seeds, probe (see configs/core_study_cpu.yaml).")) -> None:
    """Run a matrix of encoders x tasks x protocols x seeds (pretraining where asked), skipping cells already in
    out/results.jsonl, and print the table (mean ± std over seeds)."""
    from sslbench.bench import load_bench_config, run_bench

    run_bench(load_bench_config(config))


@app.command()
def methods() -> None:
    """List the pretraining methods and their options with defaults."""
    from sslbench.methods import METHODS

    for name, cls in METHODS.items():
        options = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls.Options))
        typer.echo(f"{name}: {options}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder for checkpoints and results.jsonl."),
    fast: bool = typer.Option(False, "--fast", help="A smaller run (about a minute on 2 cores) for CI and a first look."),
    seed: int = typer.Option(0, help="Random seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the contents of a non-empty --out."),
) -> None:
    """Pretrain SimCLR and DDAE on the built-in scenes, evaluate them and random init on four tasks, print the table."""
    from sslbench.demo import run_demo

    run_demo(out, fast=fast, seed=seed, overwrite=overwrite)


def main() -> None:
    """Entry point: run the app, turning every user error into one line and exit code 2."""
    _quiet()
    os.environ.setdefault("TQDM_MININTERVAL", "1")
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except USAGE_ERROR as exc:
        command = exc.ctx.command_path if exc.ctx else "sslbench"
        message = " ".join(exc.format_message().split())
        sys.stderr.write(f"error: {message}; see '{command} --help'\n")
        sys.exit(2)
    except SslbenchError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
