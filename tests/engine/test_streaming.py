"""Streaming pretraining data: the same batches, losses, resume and palette as the in-memory folder."""

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from safetensors.torch import load_file

from sslbench import engine
from sslbench.data.folder import ImageFiles, load_image_folder
from sslbench.engine import LAST_CHECKPOINT, RunConfig, ShuffledBatches, StreamedBatches, pretrain, worker_error_message
from sslbench.errors import ConfigError, DataError
from sslbench.methods import METHODS

RESNET = {"backbone": "resnet18", "width": 0.125, "stem": "cifar"}
SIMCLR = {"projection_hidden": 32, "projection_dim": 16}
IGPT = {"depth": 2, "width": 32, "heads": 2, "grid": 8, "palette_size": 16, "palette_pixels": 2048}
SIZE = 16


def _write_folder(folder, count):
    """``count`` random-pixel PNGs of two sizes (20x20 and 24x18), so every one is resized."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        shape = (20, 20, 3) if i % 2 else (18, 24, 3)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(folder / f"image{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("data") / "images", 40)


@pytest.fixture(scope="module")
def in_memory(folder):
    return load_image_folder(folder, image_size=SIZE).images


class _Interrupt(Callback):
    """Stops training after the first epoch, as a killed job would (its schedule still planned for more)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _pretrain(out, images, workers=0, method="simclr", options=SIMCLR, epochs=2, resume=False, interrupt=False):
    backbone = RESNET if method == "simclr" else None
    return pretrain(method, images, RunConfig(out=out, progress=False, resume=resume, loader_workers=workers),
                    backbone=backbone, options=options, train={"epochs": epochs, "batch_size": 8},
                    callbacks=[_Interrupt()] if interrupt else None)


@pytest.fixture(scope="module")
def stream_run(folder, tmp_path_factory):
    """A 2-epoch SimCLR run streamed by two loader workers: (its output folder, its result).

    Module fixtures run before the function-wide one-thread setting (conftest), and the runs it is compared
    with train on one thread: so does this one, or thread-count rounding alone would tell them apart."""
    out = tmp_path_factory.mktemp("runs") / "stream"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return out, _pretrain(out, ImageFiles.from_folder(folder, SIZE), workers=2)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_are_the_in_memory_batches(folder, in_memory, workers):
    streamed = StreamedBatches(ImageFiles.from_folder(folder, SIZE), batch_size=8, seed=3)
    shuffled = ShuffledBatches(in_memory, batch_size=8, seed=3)
    assert len(streamed) == len(shuffled) == 5
    # Non-persistent workers start at every pass over the loader from a copy of the dataset: set_epoch before
    # the pass must reach them, or epoch 1 would repeat epoch 0's order.
    loader = torch.utils.data.DataLoader(streamed, batch_size=None, num_workers=workers)
    epochs = []
    for epoch in (0, 1):
        streamed.set_epoch(epoch)
        shuffled.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 5
        for index, batch in enumerate(batches):
            assert batch.dtype == torch.uint8 and batch.shape == (8, 3, SIZE, SIZE)
            assert torch.equal(batch, shuffled[index])
        epochs.append(torch.cat(batches))
    assert not torch.equal(epochs[0], epochs[1])


def test_streamed_pretraining_gives_the_in_memory_losses(folder, in_memory, stream_run, tmp_path, monkeypatch):
    samples = []
    monkeypatch.setattr(ImageFiles, "sample", lambda self, count, generator: samples.append(count))
    memory = _pretrain(tmp_path / "memory", in_memory)
    streamed = _pretrain(tmp_path / "stream0", ImageFiles.from_folder(folder, SIZE), workers=0)
    assert len(memory.epoch_losses) == 2
    assert streamed.epoch_losses == memory.epoch_losses
    assert stream_run[1].epoch_losses == memory.epoch_losses  # two workers
    assert samples == []  # SimCLR fits no data-dependent state, so the stream decodes no sample for it
    weights = [load_file(str(out / "encoder.safetensors")) for out in (tmp_path / "memory", stream_run[0])]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_resumed_stream_run_reproduces_the_uninterrupted_one(folder, stream_run, tmp_path):
    # Lightning forks a resumed run's first workers before any epoch hook: they must get epoch 1's order anyway.
    files = ImageFiles.from_folder(folder, SIZE)
    first = _pretrain(tmp_path / "split", files, workers=2, interrupt=True)
    assert len(first.epoch_losses) == 1
    _pretrain(tmp_path / "split", files, workers=2, resume=True)
    straight = torch.load(stream_run[0] / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
    split = torch.load(tmp_path / "split" / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
    assert split["global_step"] == straight["global_step"] == 10
    for key, value in straight["state_dict"].items():
        assert torch.allclose(value.float(), split["state_dict"][key].float(), atol=1e-6), key


def test_a_corrupt_file_in_a_worker_is_named_on_one_line(tmp_path):
    folder = _write_folder(tmp_path / "images", 8)
    (folder / "image03.png").write_bytes(b"not a png at all")  # batch 8 of 8 images: every batch holds it
    with pytest.raises(DataError) as error:
        _pretrain(tmp_path / "run", ImageFiles.from_folder(folder, SIZE), workers=2, epochs=1)
    message = str(error.value)
    assert message.startswith("cannot read image ") and "image03.png" in message
    assert message.endswith("; remove or replace it") and "\n" not in message


def test_worker_error_message_keeps_one_line_messages():
    assert worker_error_message(DataError("cannot read image a.png: bad; remove or replace it")) == \
        "cannot read image a.png: bad; remove or replace it"
    relayed = DataError("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                        '  File "x.py", line 3, in f\nsslbench.errors.DataError: cannot read image b.png: bad; fix it\n')
    assert worker_error_message(relayed) == "cannot read image b.png: bad; fix it"


def test_mask_methods_and_negative_workers_are_refused(folder, tmp_path):
    files = ImageFiles.from_folder(folder, SIZE)
    mask_method = next(name for name, cls in sorted(METHODS.items()) if cls.needs_masks)
    with pytest.raises(ConfigError, match=f"method {mask_method} computes masks .* streaming does not support; "
                                          "load the data in memory instead"):
        pretrain(mask_method, files, RunConfig(out=tmp_path / "masks", progress=False), train={"batch_size": 8})
    with pytest.raises(ConfigError, match="loader_workers=-1 is out of range"):
        _pretrain(tmp_path / "workers", files, workers=-1)
    with pytest.raises(ConfigError, match="batch size 64 is larger than the dataset \\(40 images\\)"):
        StreamedBatches(files, batch_size=64, seed=0)
    assert not (tmp_path / "masks").exists() and not (tmp_path / "workers").exists()


def test_igpt_fits_its_palette_on_the_stream_sample(folder, in_memory, tmp_path, monkeypatch):
    sample = ImageFiles.sample
    counts = []

    def recording_sample(self, count, generator):
        counts.append(count)
        return sample(self, count, generator)

    monkeypatch.setattr(ImageFiles, "sample", recording_sample)
    memory = _pretrain(tmp_path / "memory", in_memory, method="igpt", options=IGPT, epochs=1)
    streamed = _pretrain(tmp_path / "stream", ImageFiles.from_folder(folder, SIZE), workers=2, method="igpt",
                         options=IGPT, epochs=1)
    assert counts == [engine.STREAM_SAMPLE_IMAGES]  # bounded; the in-memory run decodes nothing
    palettes = [torch.load(tmp_path / name / LAST_CHECKPOINT, map_location="cpu", weights_only=False)["state_dict"]
                for name in ("memory", "stream")]
    assert bool(palettes[1]["encoder.palette.fitted"])
    # 40 images are fewer than the bound: the sample is the whole folder in path order, hence the same palette.
    assert torch.equal(palettes[0]["encoder.palette.colours"], palettes[1]["encoder.palette.colours"])
    assert streamed.epoch_losses == memory.epoch_losses
