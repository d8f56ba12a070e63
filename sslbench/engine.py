"""The training engine: Lightning Trainer set-up, the uint8 batch loaders, checkpoints and export.

CPU or GPU is chosen automatically. On a GPU the run uses bf16 autocast and keeps the uint8 images in GPU memory when they
fit (``RunConfig.data_on_device``); convnet methods run in channels_last
on both (a CIFAR ResNet's fp32 training step is 1.4x faster in it on the CPU, ``benchmarks/cpu_step_layouts.py``); several
GPUs or nodes use Lightning's DDP/FSDP strategies unchanged (``strategy``/``devices``/``num_nodes``).
Checkpoints are written atomically (temporary file, then rename), so a killed run never leaves a
truncated ``last.ckpt``; ``resume=True`` continues from it with the same optimiser, schedule, epoch
and per-step random streams.

Training images come either as one uint8 tensor in memory (``ShuffledBatches``: a batch is one indexing op) or,
for folders too large for memory, as an ``ImageFiles`` stream (``StreamedBatches``: each batch decoded from disk by
DataLoader workers, every epoch again). Both walk the same (seed, epoch) permutation, so a run gives the same
batches, losses and resume either way.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file, save_file

from sslbench import __version__
from sslbench.backbones import Encoder, build_encoder
from sslbench.data.folder import ImageFiles
from sslbench.errors import ConfigError, DataError, SslbenchError

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_SPEC = "encoder.json"
LAST_CHECKPOINT = "last.ckpt"


STREAM_SAMPLE_IMAGES = 10_000
"""At most this many images of a stream are decoded for ``initialise_from_data``: iGPT and BEiT fit their palette on
65,536 pixels drawn from these images (a tensor in memory gives them all of its images), and the sample holds
1.5 GB at 224 px instead of a whole dataset."""


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``count`` rows that epoch ``epoch`` walks: a function of (seed, epoch) only, so an
    in-memory and a streamed run see the same batches, and a resumed run those of an uninterrupted one."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def check_batch_size(batch_size: int, count: int) -> None:
    if count < batch_size:
        raise ConfigError(f"batch size {batch_size} is larger than the dataset ({count} images); lower --batch-size")


class ShuffledBatches(torch.utils.data.Dataset):
    """Item i is batch i of a (seed, epoch)-seeded permutation, gathered with one indexing op.

    Yielding whole uint8 batches (the DataLoader runs with ``batch_size=None``) avoids per-sample
    Python work and collation; under DDP Lightning's distributed sampler splits the batch indices
    across processes, so each process gets different batches of the same permutation. With
    ``masks`` (N, H, W) (per-pixel segment ids, for methods with ``needs_masks``) an item is the pair
    ``(images, masks)`` of the same rows; ``split_batch`` takes either form apart.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, masks: torch.Tensor | None = None):
        check_batch_size(batch_size, len(images))
        if masks is not None and masks.shape != (images.shape[0], *images.shape[2:]):
            raise DataError(f"masks of shape {tuple(masks.shape)} do not match images {tuple(images.shape)}; "
                            "give one (H, W) mask per image")
        self.images = images
        self.masks = masks
        self.batch_size = batch_size
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.order = epoch_order(len(self.images), self.seed, epoch).to(self.images.device)

    def to(self, device: torch.device) -> None:
        """Keep the images (and masks) on ``device``: each batch is then gathered there, with no host copy."""
        self.images = self.images.to(device)
        self.masks = None if self.masks is None else self.masks.to(device)
        self.order = self.order.to(device)

    def __len__(self) -> int:
        return len(self.images) // self.batch_size  # drop_last: every step sees a full batch

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.images[rows] if self.masks is None else (self.images[rows], self.masks[rows])


class StreamedBatches(torch.utils.data.Dataset):
    """The streaming twin of ``ShuffledBatches``: item i is batch i of the same (seed, epoch) permutation, decoded.

    Only file paths are held; each item decodes and resizes its ``batch_size`` images (``ImageFiles.decode``),
    in a DataLoader worker when the loader has workers, so the decoding of the next batches overlaps the
    training step. The cost is decoding every image once per epoch, which in-memory data pays once per run.
    Workers are not persistent: each epoch's workers start from a copy of this dataset taken after
    ``set_epoch`` drew that epoch's permutation (``_EpochShuffle``, on resume too), so they walk the new order.
    """

    def __init__(self, files: ImageFiles, batch_size: int, seed: int):
        check_batch_size(batch_size, len(files))
        self.files = files
        self.batch_size = batch_size
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.order = epoch_order(len(self.files), self.seed, epoch)

    def __len__(self) -> int:
        return len(self.files) // self.batch_size  # drop_last, as ShuffledBatches

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.files.decode(self.order[index * self.batch_size:(index + 1) * self.batch_size])


def split_batch(batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, masks or None) of a ``ShuffledBatches`` item (Lightning may turn the pair into a list)."""
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    return batch, None


class _EpochShuffle(Callback):
    """Draws each epoch's permutation before Lightning starts that epoch's DataLoader iterator (and its workers).

    On resume Lightning starts the first iterator before any epoch hook, so the epoch to resume at also travels
    in the checkpoint and is drawn when the checkpoint is restored; otherwise the loader workers forked then
    would walk the interrupted epoch's order (a loader without workers reads the order when it gathers a batch).
    """

    def __init__(self, dataset: ShuffledBatches | StreamedBatches):
        self.dataset = dataset
        self.next_epoch = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dataset.set_epoch(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.next_epoch = trainer.current_epoch + 1  # checkpoints are written at epoch ends, after this hook

    def state_dict(self) -> dict[str, int]:
        return {"next_epoch": self.next_epoch}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.dataset.set_epoch(state_dict["next_epoch"])


DEVICE_DATA_FRACTION = 0.25
"""The data moves to the GPU when it takes at most this share of the GPU's memory (CIFAR-10's 50,000 images are
150 MB, 0.2% of an 80 GB card), leaving the rest to the model and its activations."""


def data_fits_on_device(nbytes: int, device_bytes: int) -> bool:
    return nbytes <= DEVICE_DATA_FRACTION * device_bytes


class DataOnDevice(Callback):
    """Moves the uint8 dataset to the training device once, when the strategy knows it (each DDP process its own)."""

    def __init__(self, dataset: ShuffledBatches):
        self.dataset = dataset

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dataset.to(trainer.strategy.root_device)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``path.tmp`` and rename, so ``last.ckpt`` is always complete."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class TrainingStats(Callback):
    """Per epoch: seconds of training (callbacks such as kNN monitors excluded), images seen, mean loss."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.images_seen: list[int] = []
        self.epoch_losses: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += len(split_batch(batch)[0])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.epoch_seconds.append(time.perf_counter() - self._start)
        self.images_seen.append(self._images)
        loss = trainer.callback_metrics.get("loss_epoch")
        self.epoch_losses.append(float(loss) if loss is not None else float("nan"))


class ExportEncoder(Callback):
    """Export the encoder (safetensors + JSON spec) at the end of every epoch and of training."""

    def __init__(self, out: Path, info: dict[str, Any]):
        self.out = out
        self.info = info

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            export_encoder(pl_module.export_encoder(), self.out, {**self.info, "epochs": trainer.current_epoch + 1})


@dataclass
class RunConfig:
    """Where and how to run: output folder, devices, precision."""

    out: Path
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str | None = None
    resume: bool = False
    progress: bool = True
    compile: bool = False
    data_on_device: bool = True
    """On a GPU, keep the uint8 images in GPU memory when they fit (``DEVICE_DATA_FRACTION``), so a step gathers its
    batch there instead of copying it from the host; augmentation already runs on the device."""
    loader_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    """DataLoader worker processes decoding a streamed dataset (``ImageFiles``), each process its own; 0 decodes in
    the training process. In-memory tensors need none: gathering a batch is one indexing op."""


def cuda_available(accelerator: str) -> bool:
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 BF16 or AMX). Without them PyTorch runs bf16
    convolutions in its slow reference path: on a 2-core AVX2 EPYC one step of the lean DDAE U-Net took 36 s in bf16
    against 1.8 s in fp32 (``benchmarks/unet_step.py``), so bf16 there costs time instead of saving it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compile_for_training(module: L.LightningModule) -> None:
    """``--compile``: ``torch.compile`` each of the method's ``compiled_modules`` in place.

    In place (``nn.Module.compile``), the parameters keep their names, so checkpoints and exported encoders are
    the same with and without the flag. Wrapping the encoder (``torch.compile(module.encoder)``, this function's
    predecessor) prefixed them with ``_orig_mod.`` and compiled only the encoder's own ``forward``: DDAE's loss calls
    the U-Net, which stayed eager."""
    for part in module.compiled_modules():
        part.compile()


def cpu_channels_last_hazard(model: nn.Module) -> str | None:
    """The first strided 1x1 convolution of ``model`` with fewer than 8 input channels, which the engine keeps out of
    channels_last on the CPU (the whole model stays contiguous then). In channels_last, oneDNN's AVX2 kernel for its
    weight gradient (``jit_1x1:avx2``, PyTorch 2.15) corrupts the heap: the process hangs or dies with SIGSEGV or
    SIGABRT a few steps later (2 to 6 input channels failed on 32 px maps, 2 to 4 on 16 px ones; 1, 7 and 8 to 32 never did). Real
    models are wider; the tiny test ResNets (width 1/16: a 4 -> 8 channel shortcut) are not."""
    return next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                 and max(m.stride) > 1 and m.in_channels < 8), None)


def make_trainer(run: RunConfig, epochs: int, callbacks: list[Callback]) -> L.Trainer:
    on_gpu = cuda_available(run.accelerator)
    precision = run.precision or ("bf16-mixed" if on_gpu else "32-true")
    if not on_gpu and precision.startswith("bf16") and not cpu_has_native_bf16():
        rank_zero_warn(f"--precision {precision} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native bf16) "
                       "runs convolutions in PyTorch's slow reference path, several times slower than fp32; "
                       "use --precision 32-true here")
    # One file, last.ckpt, replaced at every epoch end. (save_last=True with save_top_k=0 writes last.ckpt only
    # when training ends: Lightning 2.6 saves "last" only next to a top-k save, so a killed run kept nothing.)
    checkpoint = ModelCheckpoint(dirpath=run.out, filename=Path(LAST_CHECKPOINT).stem, save_top_k=1, every_n_epochs=1,
                                 enable_version_counter=False)
    callbacks = [*callbacks, checkpoint]
    if run.progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    return L.Trainer(
        accelerator=run.accelerator, devices=run.devices, strategy=run.strategy, num_nodes=run.num_nodes,
        precision=precision, max_epochs=epochs, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        default_root_dir=run.out, logger=False, enable_progress_bar=run.progress, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=10, deterministic=False, benchmark=on_gpu,
    )


def export_encoder(encoder: Encoder, out: Path, info: dict[str, Any]) -> Path:
    """Write ``encoder.safetensors`` and ``encoder.json`` (spec + provenance) atomically into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in encoder.state_dict().items()}
    tmp = out / (ENCODER_WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out / ENCODER_WEIGHTS)
    meta = {"spec": encoder.spec, "sslbench_version": __version__, **info}
    tmp_json = out / (ENCODER_SPEC + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_json, out / ENCODER_SPEC)
    return out / ENCODER_WEIGHTS


def load_encoder(path: Path) -> tuple[Encoder, dict[str, Any]]:
    """Rebuild an exported encoder from its folder (or its ``encoder.safetensors`` / ``encoder.json``)."""
    folder = path if path.is_dir() else path.parent
    spec_file, weights = folder / ENCODER_SPEC, folder / ENCODER_WEIGHTS
    if not path.exists():
        raise SslbenchError(f"checkpoint {path} not found; pass the output folder of 'sslbench pretrain' (it holds {ENCODER_WEIGHTS})")
    if not spec_file.is_file() or not weights.is_file():
        raise SslbenchError(f"checkpoint folder {folder} has no {ENCODER_SPEC} + {ENCODER_WEIGHTS}; pass the output folder of 'sslbench pretrain'")
    try:
        meta = json.loads(spec_file.read_text())
        encoder = build_encoder(meta["spec"], pretrained=False)  # the weights come from the file
        state = load_file(str(weights))
    except (json.JSONDecodeError, KeyError, OSError, RuntimeError) as exc:
        raise SslbenchError(f"checkpoint {folder} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); re-export it with 'sslbench pretrain'") from None
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SslbenchError(f"checkpoint {weights} does not match its spec ({len(missing)} missing, {len(unexpected)} unexpected tensors); re-export it")
    encoder.eval()
    return encoder, meta


def legacy_settings(cls: type) -> dict[str, dict[str, Any]]:
    """Per hyper-parameter section, the values that runs from before a setting existed trained with: the method's
    ``Options.legacy`` and ``TrainConfig.legacy``. A checkpoint that lacks a setting is read with these."""
    from sslbench.methods import TrainConfig

    return {"options": getattr(cls.Options, "legacy", {}), "train": TrainConfig.legacy}


def load_training_module(path: Path) -> Any:
    """The whole method of a training checkpoint (``last.ckpt``): encoder, heads, EMA target or teacher, queues and
    centres, in eval mode. The exported encoder is what tasks evaluate; this is for inspecting what it leaves out
    (a DINO student, a BYOL target, SwAV's prototypes). Settings the checkpoint predates take ``legacy_settings``."""
    from sslbench.config import apply_overrides
    from sslbench.methods import METHODS, TrainConfig

    if not Path(path).is_file():
        raise SslbenchError(f"training checkpoint {path} not found; pass the {LAST_CHECKPOINT} in the output folder of 'sslbench pretrain'")

    def unreadable(exc: Exception) -> SslbenchError:
        return SslbenchError(f"{path} is not a readable sslbench training checkpoint ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); pass the {LAST_CHECKPOINT} that 'sslbench pretrain' wrote")

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        hparams, state = checkpoint["hyper_parameters"], checkpoint["state_dict"]
        cls = METHODS[hparams["method"]]
        legacy, where = legacy_settings(cls), f" in {path}"
        options = apply_overrides(cls.Options(), {**legacy["options"], **hparams["options"]}, where)
        train = apply_overrides(TrainConfig(), {**legacy["train"], **hparams["train"]}, where)
        backbone, image_size, steps_per_epoch = hparams["backbone"], hparams["image_size"], hparams["steps_per_epoch"]
    except (KeyError, RuntimeError, OSError, pickle.UnpicklingError) as exc:
        raise unreadable(exc) from None
    module = cls(backbone, options, train, image_size=image_size, steps_per_epoch=steps_per_epoch)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # tensors missing, unexpected or of another shape than the settings build
        raise unreadable(exc) from None
    return module.eval()


@dataclass
class PretrainResult:
    """What a pretraining run produced, for the CLI, the demo and the benchmarks."""

    out: Path
    method: str
    epoch_seconds: list[float]
    epoch_losses: list[float]
    images_per_second: float
    final_loss: float
    peak_memory_mb: float


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak allocated GPU memory when on CUDA."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class TrainingData:
    """What ``pretrain`` needs from its images, whether they are a tensor in memory or files streamed from disk."""

    loader: torch.utils.data.DataLoader
    callbacks: list[Callback]
    """Epoch shuffling, and moving in-memory data to the GPU."""
    image_size: int
    steps_per_epoch: int
    initial_images: Callable[[torch.Generator], torch.Tensor]
    """The uint8 images ``initialise_from_data`` fits data-dependent state on: all of a tensor, a seeded sample of at
    most ``STREAM_SAMPLE_IMAGES`` of a stream (decoding it is not free, so it is only asked for when a method uses it)."""


def training_data(images: torch.Tensor | ImageFiles, batch_size: int, seed: int, run: RunConfig, method_name: str,
                  dataset_masks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TrainingData:
    """The batch loader over ``images``: the one place where in-memory and streamed data part ways.

    ``dataset_masks`` computes a mask-based method's per-image masks from the whole image tensor, so it needs
    the data in memory. A stream's loader runs ``run.loader_workers`` processes, each decoding whole batches
    and keeping two ready ahead (the DataLoader's default prefetch), pinned for the copy to a GPU.
    """
    on_gpu = cuda_available(run.accelerator)
    if isinstance(images, ImageFiles):
        if dataset_masks is not None:
            raise ConfigError(f"method {method_name} computes masks over the whole dataset, which streaming does not support; "
                              "load the data in memory instead (drop --stream)")
        if run.loader_workers < 0:
            raise ConfigError(f"loader_workers={run.loader_workers} is out of range; use 0 (decode in the training process) or more")
        streamed = StreamedBatches(images, batch_size, seed)
        loader = torch.utils.data.DataLoader(streamed, batch_size=None, shuffle=False, num_workers=run.loader_workers,
                                             pin_memory=on_gpu)
        return TrainingData(loader, [_EpochShuffle(streamed)], images.image_size, len(streamed),
                            lambda generator: images.sample(STREAM_SAMPLE_IMAGES, generator))
    batch_masks = dataset_masks(images) if dataset_masks is not None else None
    dataset = ShuffledBatches(images, batch_size, seed, masks=batch_masks)
    data_bytes = images.nbytes + (batch_masks.nbytes if batch_masks is not None else 0)
    resident = on_gpu and run.data_on_device and data_fits_on_device(data_bytes, torch.cuda.get_device_properties(0).total_memory)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0, pin_memory=on_gpu and not resident)
    return TrainingData(loader, [_EpochShuffle(dataset), *([DataOnDevice(dataset)] if resident else [])],
                        int(images.shape[-1]), len(dataset), lambda generator: images)


def worker_error_message(error: DataError) -> str:
    """The one-line message of a ``DataError`` that a DataLoader worker raised.

    The DataLoader re-raises a worker's exception in the training process with the worker's whole traceback as
    its message; the last line of that traceback is the original one-line message, after the error's type.
    """
    last = str(error).strip().splitlines()[-1]
    head, found, message = last.partition(f"{type(error).__module__}.{type(error).__qualname__}: ")
    return message if found and not head else last


def check_resume_settings(last: Path, settings: dict[str, Any], legacy: dict[str, dict[str, Any]] | None = None) -> None:
    """Refuse to resume a run with other settings than it was started with (``settings``: the hyper-parameters the
    method saves). A changed lr, option or backbone would continue the run on another schedule or objective and
    silently give numbers that belong to neither run. The epoch count may change, to extend a run (the schedule
    then spans the new total). A setting the checkpoint lacks was added since the run started: it is compared with
    ``legacy[section]`` (``legacy_settings``: the value such runs trained with) where that names it, and otherwise
    not compared, as it then did not change what older runs did."""
    saved = torch.load(last, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    for section, values in (legacy or {}).items():
        if isinstance(saved.get(section), dict) and values:
            saved = {**saved, section: {**values, **saved[section]}}

    def plain(value: Any) -> Any:  # tuples and lists, paths and strings compare as they print
        return json.loads(json.dumps(value, default=str))

    for section in ("method", "backbone", "options", "train", "image_size", "steps_per_epoch"):
        if section not in saved:
            continue
        old, new = plain(saved[section]), plain(settings[section])
        if isinstance(old, dict) and isinstance(new, dict):
            changed = [(f"{section}.{key}", old[key], new[key]) for key in old
                       if key in new and old[key] != new[key] and (section, key) != ("train", "epochs")]
        else:
            changed = [(section, old, new)] if old != new else []
        if changed:
            name, before, now = changed[0]
            raise ConfigError(f"{last} was trained with {name}={before!r} and this command gives {now!r}; resume with "
                              "the run's own settings, or start a new run in another --out")


def reuse_freed_cpu_memory() -> bool:
    """Make glibc's ``malloc`` keep freed blocks of any size for reuse, instead of unmapping the large ones.

    glibc serves blocks larger than its mmap threshold (at most 32 MB) with a fresh ``mmap`` and unmaps them when
    they are freed, so a CPU training step whose activations pass that size (a 128 x 64 x 32 x 32 fp32 map is 33.5 MB)
    page-faults them in again at every step: on 2 AVX2 cores the fp32 step of ``unet-small-fast`` took 1069-1241 ms
    with the default and 819-929 ms with freed memory kept, diffusers' U-Net of the same channels 2641-2764 and
    2148-2374 ms (``python benchmarks/unet_step.py step --model M --precision fp32 --steps 6 --warmup 2
    [--reuse-freed-memory]``, two runs each).
    The process then keeps its peak memory until it exits, which a training process reaches at every step anyway.
    PyTorch's CPU tuning guide gets the same by preloading jemalloc or tcmalloc. Returns whether it applied (Linux
    with glibc; elsewhere nothing changes)."""
    import ctypes
    import sys

    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def pretrain(method_name: str, images: torch.Tensor | ImageFiles, run: RunConfig, backbone: dict[str, Any] | None = None,
             options: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
             callbacks: list[Callback] | None = None, info: dict[str, Any] | None = None,
             masks: torch.Tensor | None = None) -> PretrainResult:
    """Pretrain ``method_name`` on uint8 ``images`` (N, 3, H, W), or on an ``ImageFiles`` stream, and export its encoder to ``run.out``.

    A stream is for folders too large for memory: its batches are decoded by ``run.loader_workers`` processes
    in every epoch (the price of streaming), its images have ``ImageFiles.image_size``, and methods that fit
    data-dependent state get a sample of at most ``STREAM_SAMPLE_IMAGES`` of them; it gives the same batches,
    hence the same losses, as the tensor of the same folder.

    ``masks`` (N, H, W): the dataset's ground-truth segment ids, offered to methods with ``needs_masks``
    (DetCon), which turn them, or masks they compute themselves, into per-image masks once
    (``dataset_masks``, cached next to ``run.out``) that then travel with every batch.
    """
    from sslbench.config import apply_overrides
    from sslbench.methods import METHODS, TrainConfig
    from sslbench.methods.base import PretrainMethod

    if method_name not in METHODS:
        raise ConfigError(f"unknown method {method_name!r}; use one of {', '.join(sorted(METHODS))}")
    cls = METHODS[method_name]
    if masks is not None and not cls.needs_masks:
        raise ConfigError(f"method {method_name} does not use masks; pass masks only to a method that does "
                          f"({', '.join(sorted(name for name, m in METHODS.items() if m.needs_masks))})")
    method_options = apply_overrides(cls.Options(), options or {}, f" for method {method_name}")
    backbone = backbone or dict(cls.default_backbone)
    train_config = apply_overrides(apply_overrides(TrainConfig(), cls.train_defaults), train or {}, " for training")
    derived = {k: v for k, v in cls.derived_train_defaults(backbone, train_config).items() if k not in (train or {})}
    train_config = apply_overrides(train_config, derived)
    train_config.validate()
    last = run.out / LAST_CHECKPOINT
    if run.resume and not last.is_file():
        raise SslbenchError(f"--resume given but {last} does not exist; drop --resume to start a new run in {run.out}")
    if not run.resume and last.is_file():
        raise SslbenchError(f"{run.out} already holds a run ({LAST_CHECKPOINT}); pass --resume to continue it or choose another --out")
    torch.manual_seed(train_config.seed)
    dataset_masks = (lambda data: cls.dataset_masks(method_options, data, masks, run.out.parent)) if cls.needs_masks else None
    data = training_data(images, train_config.batch_size, train_config.seed, run, method_name, dataset_masks)
    module = cls(backbone, method_options, train_config, data.image_size, data.steps_per_epoch)
    if run.resume:
        check_resume_settings(last, dict(module.hparams), legacy_settings(cls))
    # On resume the checkpoint restores this state (recomputing it could differ); methods without any never
    # make a stream decode its sample.
    if not run.resume and cls.initialise_from_data is not PretrainMethod.initialise_from_data:
        sample = data.initial_images(torch.Generator().manual_seed(train_config.seed))
        module.initialise_from_data(sample, torch.Generator().manual_seed(train_config.seed))
    if cls.channels_last and (cuda_available(run.accelerator) or cpu_channels_last_hazard(module) is None):
        module = module.to(memory_format=torch.channels_last)
    run.out.mkdir(parents=True, exist_ok=True)
    if not cuda_available(run.accelerator):
        reuse_freed_cpu_memory()
    if run.compile:
        compile_for_training(module)
    stats = TrainingStats()
    meta = {"method": method_name, "image_size": data.image_size, "options": method_options.__dict__, "train": train_config.__dict__,
            **module.export_meta(), **(info or {})}
    trainer = make_trainer(run, train_config.epochs, [*data.callbacks, stats, ExportEncoder(run.out, meta), *(callbacks or [])])
    try:
        trainer.fit(module, data.loader, ckpt_path=str(last) if run.resume else None)
    except DataError as error:  # a corrupt file met by a loader worker
        raise DataError(worker_error_message(error)) from None
    seconds = sum(stats.epoch_seconds)
    return PretrainResult(
        out=run.out, method=method_name, epoch_seconds=stats.epoch_seconds, epoch_losses=stats.epoch_losses,
        images_per_second=sum(stats.images_seen) / seconds if seconds else 0.0,
        final_loss=stats.epoch_losses[-1] if stats.epoch_losses else float("nan"), peak_memory_mb=peak_memory_mb(),
    )
