"""The DDAE readout study (Xiang et al. 2023, "Denoising Diffusion Autoencoders are Unified Self-supervised
Learners", section 4): which noise level and which U-Net block give the best features for a probe.

For each readout level the U-Net runs once over the train and test images, every requested block read
from that one pass (``DiffusionEncoder.read_blocks``); each block's features are cached and one head per
(level, block) cell is trained on the cache and scored on the test set. The study's ablations are options:
clean input (t = 0) vs noise, EMA vs raw weights, a pooled linear head vs a small conv head on the block's
map (or a training-free kNN vote), and the probe's optimiser (Adam vs AdamW, ``ProbeConfig.optimizer``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sslbench.backbones.diffusion import DDPMSchedule, DiffusionEncoder, EDMSchedule
from sslbench.data.base import ImageSet
from sslbench.engine import LAST_CHECKPOINT, load_encoder
from sslbench.errors import ConfigError, SslbenchError
from sslbench.tasks.heads import TaskHead, counting_conv_task_head, linear_task_head
from sslbench.tasks.metrics import knn_predict, top1
from sslbench.tasks.probe import CachedFeatures, ProbeConfig, fit_cached, frozen, predict_cached, seeded

DEFAULT_TIMESTEPS = (0, 11, 50, 100)
"""Clean input, DDAE's best CIFAR-10 DDPM readout (t = 11) and two noisier levels."""

HEADS = ("linear", "conv", "knn")
"""``linear``: a ``LinearHead`` on the block's pooled vector (DDAE's protocol); ``conv``: two conv-BN-ReLU
blocks, pooling and a linear layer on the block's map; ``knn``: the weighted kNN vote, no training."""

WEIGHTS = ("ema", "raw")

RAW_PREFIXES = ("encoder.unet.", "encoder._orig_mod.unet.")
"""Where a DDAE ``last.ckpt`` keeps the raw (non-EMA) U-Net weights: the second is that of runs made with ``--compile``
before it compiled in place (``engine.compile_for_training``)."""


@dataclass
class StudyCell:
    """The test top-1 accuracy of one (readout level, block) cell and the seconds its head took."""

    t: float
    block: str
    top1: float
    seconds: float


def load_diffusion_encoder(checkpoint: Path, weights: str = "ema") -> tuple[DiffusionEncoder, dict[str, Any]]:
    """The exported diffusion encoder of a ``ddae``/``ddae_edm`` run folder, with its EMA weights (what
    ``pretrain`` exports) or the raw training weights read from the run's ``last.ckpt``."""
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r} is not allowed; use one of {', '.join(WEIGHTS)}")
    encoder, meta = load_encoder(checkpoint)
    if not isinstance(encoder, DiffusionEncoder):
        raise ConfigError(f"checkpoint {checkpoint} holds a {meta['spec'].get('backbone')} encoder; "
                          "probe-diffusion needs the output folder of 'sslbench pretrain --method ddae' (or ddae_edm)")
    if weights == "raw":
        folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
        last = folder / LAST_CHECKPOINT
        if not last.is_file():
            raise SslbenchError(f"{folder} has no {LAST_CHECKPOINT}, which holds the raw weights; use --weights ema "
                                "or pass the output folder of the 'sslbench pretrain' run itself")
        state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
        raw = {key.removeprefix(prefix): value for key, value in state.items() for prefix in RAW_PREFIXES if key.startswith(prefix)}
        missing, unexpected = encoder.unet.load_state_dict(raw, strict=False)
        if missing or unexpected:
            raise SslbenchError(f"{last} does not hold this encoder's raw U-Net ({len(missing)} missing, "
                                f"{len(unexpected)} unexpected tensors); was it written by a ddae run?")
    return encoder, meta


def study_levels(encoder: DiffusionEncoder, timesteps: str | None, sigmas: str | None, no_noise: bool) -> list[float]:
    """The readout levels of the grid from the command line: ``--timesteps`` (comma-separated integers)
    for DDPM models, ``--sigmas`` for EDM ones, ``--no-noise`` for the clean image only, else the defaults."""
    edm = isinstance(encoder.schedule, EDMSchedule)
    given, wrong = (sigmas, timesteps) if edm else (timesteps, sigmas)
    if wrong is not None:
        kind, option = ("an EDM (ddae_edm)", "--sigmas") if edm else ("a DDPM (ddae)", "--timesteps")
        raise ConfigError(f"the checkpoint holds {kind} model; give its readout levels with {option}")
    if no_noise:
        if given is not None:
            raise ConfigError("give either --no-noise (t = 0 only) or readout levels, not both")
        return [0]
    if given is None:
        return default_levels(encoder)
    try:
        levels = [float(item) for item in given.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"readout levels {given!r} are not comma-separated numbers; write e.g. 0,11,50,100") from None
    for level in levels:
        encoder.schedule.check_level(level)
    return levels if edm else [int(level) for level in levels]


def default_levels(encoder: DiffusionEncoder) -> list[float]:
    """``DEFAULT_TIMESTEPS`` for DDPM models; for EDM models the same noise levels as sigmas (3 decimals)."""
    if isinstance(encoder.schedule, DDPMSchedule):
        return list(DEFAULT_TIMESTEPS)
    ddpm = DDPMSchedule()
    return [round(ddpm.equivalent_sigma(t), 3) for t in DEFAULT_TIMESTEPS]


@torch.no_grad()
def extract_blocks(encoder: DiffusionEncoder, images: ImageSet, blocks: list[str], *, batch_size: int,
                   device: str | torch.device, maps: bool) -> dict[str, CachedFeatures]:
    """Every block's features of ``images`` at the encoder's level ``t``, one U-Net pass per batch:
    the pooled vector (float32) and, with ``maps``, the block's map keyed by its stride (float16)."""
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name in blocks}
    block_maps: dict[str, list[torch.Tensor]] = {name: [] for name in blocks}
    with frozen(encoder, device):
        for batch in images.images.split(batch_size):
            for name, feature_map in encoder.read_blocks(batch.to(device).float().div_(255), blocks).items():
                pooled[name].append(feature_map.float().mean((2, 3)).cpu())
                if maps:
                    block_maps[name].append(feature_map.to("cpu", torch.float16))
    return {
        name: CachedFeatures(pooled=torch.cat(pooled[name]),
                             maps={encoder.unet.block_stride(name): torch.cat(block_maps[name])} if maps else {},
                             image_size=images.image_size)
        for name in blocks
    }


def _head(head: str, features: CachedFeatures, num_classes: int, config: ProbeConfig) -> TaskHead:
    if head == "conv":
        return counting_conv_task_head(features.map_channels, num_classes, config.decoder_width)
    return linear_task_head(features.pooled.shape[1], num_classes)


def score_cell(head: str, train: CachedFeatures, train_labels: torch.Tensor, test: CachedFeatures,
               test_labels: torch.Tensor, num_classes: int, config: ProbeConfig) -> float:
    """Test top-1 of one cell: a kNN vote, or a head trained with cross-entropy on the cached train features."""
    if head == "knn":
        predicted = knn_predict(train.pooled.to(config.device), train_labels.to(config.device), test.pooled.to(config.device),
                                num_classes, k=config.knn_k, temperature=config.knn_temperature).cpu()
        return top1(predicted, test_labels)
    with seeded(config.seed, config.device):
        task_head = _head(head, train, num_classes, config)
        fit_cached(task_head, train, train_labels, F.cross_entropy, config)
    predicted = torch.cat([logits.argmax(1).cpu() for _, logits in predict_cached(task_head, test, config)])
    return top1(predicted, test_labels)


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ConfigError(f"--head {head!r} is not allowed; use one of {', '.join(HEADS)}")


def run_study(encoder: DiffusionEncoder, train: ImageSet, test: ImageSet, levels: list[float], blocks: list[str],
              head: str, config: ProbeConfig) -> list[StudyCell]:
    """One cell per (level, block), levels in the outer loop; the encoder's ``t`` is restored afterwards."""
    check_head(head)
    if not levels or not blocks:
        raise ConfigError("the study needs at least one readout level and one block; give --timesteps/--sigmas and --blocks")
    if "class" not in train.targets or "class" not in test.targets or "class" not in train.num_classes:
        raise ConfigError(f"dataset {train.name!r} has no class labels; probe-diffusion needs a classification dataset")
    for name in blocks:
        encoder.unet.block_stride(name)  # a ConfigError naming the valid blocks
    for level in levels:
        encoder.schedule.check_level(level)
    batch_size = config.dense_batch_size if head == "conv" else config.batch_size
    num_classes = train.num_classes["class"]
    home_level = encoder.t
    cells = []
    try:
        for level in levels:
            encoder.t = level
            options = dict(batch_size=batch_size, device=config.device, maps=head == "conv")
            train_blocks = extract_blocks(encoder, train, blocks, **options)
            test_blocks = extract_blocks(encoder, test, blocks, **options)
            for name in blocks:
                start = time.perf_counter()
                value = score_cell(head, train_blocks[name], train.targets["class"], test_blocks[name],
                                   test.targets["class"], num_classes, config)
                cells.append(StudyCell(level, name, value, time.perf_counter() - start))
    finally:
        encoder.t = home_level
    return cells


def select_readout(encoder: DiffusionEncoder, train: ImageSet, levels: list[float], blocks: list[str],
                   config: ProbeConfig, validation_fraction: float = 0.25) -> tuple[DiffusionEncoder, list[StudyCell]]:
    """The encoder re-read at its best (level, block) by kNN top-1 on a held-out slice of ``train``.

    DDAE's readout is a hyper-parameter of the method (the paper picks it per model), so it must be chosen
    without the test set: the last ``validation_fraction`` of the training images score the cells against
    the rest. The returned encoder shares the U-Net and keeps the dense-task pyramid.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction={validation_fraction} is out of range; use a value in (0, 1)")
    split = int(len(train) * (1.0 - validation_fraction))
    if split < 1 or split >= len(train):
        raise ConfigError(f"{len(train)} training images are too few to hold out a validation slice for the readout")
    cells = run_study(encoder, train.subset(slice(0, split)), train.subset(slice(split, None)), levels, blocks, "knn", config)
    best = max(cells, key=lambda cell: cell.top1)
    chosen = DiffusionEncoder(encoder.unet, t=best.t, block=best.block, pyramid_blocks=encoder.pyramid_blocks,
                              noise_seed=encoder.noise_seed, schedule=encoder.schedule)
    return chosen.eval(), cells


def study_grid(cells: list[StudyCell]) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the grid: one line per block, one column per level, the best cell marked ``*``.

    Blocks go down the rows because a U-Net has many (16 in the small one) and levels are few: the
    table then fits a terminal's width."""
    levels = list(dict.fromkeys(cell.t for cell in cells))
    blocks = list(dict.fromkeys(cell.block for cell in cells))
    best = max(cells, key=lambda cell: cell.top1) if cells else None
    values = {(cell.t, cell.block): f"{cell.top1:.3f}" + ("*" if cell is best else "") for cell in cells}
    header = ["block \\ t", *(f"{level:g}" for level in levels)]
    body = [[name, *(values.get((level, name), "-") for level in levels)] for name in blocks]
    return header, body


def study_rows(cells: list[StudyCell], common: dict[str, Any], method: str, weights: str) -> list[dict[str, Any]]:
    """Result rows (``sslbench.results``), one per cell, with ``t`` and ``block`` fields. The method label
    names the readout, so ``sslbench results`` lists every cell on its own line."""
    suffix = " raw" if weights == "raw" else ""
    return [{**common, "method": f"{method}{suffix} t={cell.t:g} {cell.block}", "metric": "top1", "value": cell.top1,
             "seconds": round(cell.seconds, 3), "t": cell.t, "block": cell.block, "weights": weights} for cell in cells]


def print_grid(cells: list[StudyCell], title: str) -> None:
    """Print ``study_grid`` as a table."""
    from sslbench.results import print_table

    print_table(*study_grid(cells), title=title)
