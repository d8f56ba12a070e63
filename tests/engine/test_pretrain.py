"""Pretraining end to end on the procedural scenes: losses fall, resume is exact, exports reload."""

from pathlib import Path
import warnings

import pytest
from lightning.pytorch.callbacks import Callback
import torch
from safetensors.torch import load_file

from sslbench import engine
from sslbench.backbones import build_encoder
from sslbench.backbones.vit import VIT_PRESETS
from sslbench.data import load_dataset
from sslbench.engine import LAST_CHECKPOINT, RunConfig, ShuffledBatches, DataOnDevice, data_fits_on_device, load_encoder, pretrain
from sslbench.errors import ConfigError, SslbenchError
from sslbench.methods import METHODS, detcon

RESNET = {"backbone": "resnet18", "width": 0.125, "stem": "cifar"}
UNET = {"backbone": "ddpm_unet"}


@pytest.fixture(scope="module")
def scenes():
    return load_dataset("scenes", None, "train", limit=256).images


@pytest.fixture(scope="module")
def small_scenes():
    """64 scenes at 16 px: two steps of batch 32 per epoch."""
    return load_dataset("scenes", None, "train", limit=64, image_size=16).images


class _Interrupt(Callback):
    """Stops training after ``epochs`` epochs, as a killed job would (its schedule still planned for more)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _run(tmp_path, name, images, method, backbone, epochs, resume=False, options=None, stop_after=None, **train):
    options = options or ({"unet": "tiny"} if method == "ddae" else {})
    return pretrain(method, images, RunConfig(out=tmp_path / name, progress=False, resume=resume),
                    backbone=backbone, options=options, train={"epochs": epochs, "batch_size": 64, **train},
                    callbacks=[_Interrupt(stop_after)] if stop_after else None)


def test_simclr_training_lowers_the_loss(tmp_path, scenes):
    # Batch 32: the loss starts near log(2 * 32 - 1) = 4.14 (chance) and must fall clearly below it.
    result = _run(tmp_path, "simclr", scenes, "simclr", RESNET, 6, options={"temperature": 0.2}, batch_size=32)
    assert result.epoch_losses[0] > 4.0
    assert result.epoch_losses[-1] < result.epoch_losses[0] - 0.05
    encoder, meta = load_encoder(tmp_path / "simclr")
    assert meta["method"] == "simclr" and meta["epochs"] == 6
    assert encoder(torch.rand(2, 3, 32, 32)).pooled.shape == (2, 64)


def test_ddae_training_lowers_the_loss_and_exports_a_diffusion_encoder(tmp_path, scenes):
    result = _run(tmp_path, "ddae", scenes, "ddae", UNET, 4, lr=2e-3)
    assert result.epoch_losses[-1] < result.epoch_losses[0] * 0.8
    encoder, meta = load_encoder(tmp_path / "ddae")
    assert meta["spec"]["backbone"] == "ddpm_unet" and meta["spec"]["t"] == 11
    features = encoder(torch.rand(2, 3, 32, 32))
    assert features.pooled.shape == (2, encoder.pooled_dim)


@pytest.mark.parametrize("method,backbone", [("simclr", RESNET), ("ddae", UNET)])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, scenes, method, backbone):
    _run(tmp_path, "straight", scenes, method, backbone, 2)
    _run(tmp_path, "split", scenes, method, backbone, 2, stop_after=1)
    _run(tmp_path, "split", scenes, method, backbone, 2, resume=True)
    straight = load_file(str(tmp_path / "straight" / "encoder.safetensors"))
    split = load_file(str(tmp_path / "split" / "encoder.safetensors"))
    assert straight.keys() == split.keys()
    for key in straight:
        assert torch.allclose(straight[key], split[key], atol=1e-6), key


STATEFUL_RUNS = {
    # Queue of 128 keys, 64 enqueued per step: after epoch 0 it holds keys of both steps, used as
    # negatives in epoch 1 next to the key encoder's EMA.
    "moco": {"queue_size": 128, "projection_hidden": 32, "projection_dim": 16},
    # The target momentum follows a cosine over the 4 steps: a resumed run must continue it at step 2.
    "byol": {"projection_hidden": 32, "projection_dim": 16, "prediction_hidden": 32},
    # Teacher (EMA), centre, teacher-temperature warm-up by step, last layer frozen in epoch 0 only.
    "dino": {"hidden": 32, "bottleneck": 16, "prototypes": 32},
    # Per-view queues of 64 fill during epoch 0 and enter Sinkhorn in epoch 1; prototypes frozen in epoch 0.
    "swav": {"projection_hidden": 32, "projection_dim": 16, "prototypes": 16, "local_views": 0, "queue_size": 64},
    # EMA target with BYOL's schedule, on FH masks that the resumed run reads back from the disk cache.
    "detcon_b": {"num_masks": 4, "projection_hidden": 32, "projection_dim": 16, "prediction_hidden": 32},
}


def _state(path):
    return torch.load(path / LAST_CHECKPOINT, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("method", sorted(STATEFUL_RUNS))
def test_resume_restores_targets_queues_centres_and_schedules(tmp_path, small_scenes, method):
    options = STATEFUL_RUNS[method]
    _run(tmp_path, "straight", small_scenes, method, RESNET, 2, options=options, batch_size=32)
    first = _run(tmp_path, "split", small_scenes, method, RESNET, 2, options=options, batch_size=32, stop_after=1)
    assert len(first.epoch_losses) == 1 and _state(tmp_path / "split")["epoch"] == 0  # stopped after epoch 0
    if METHODS[method].needs_masks:
        assert len(list(tmp_path.glob("fh-masks-*.npy"))) == 1
        detcon._FH_MEMORY.clear()  # the resumed run must read the same masks back from the disk cache
    _run(tmp_path, "split", small_scenes, method, RESNET, 2, options=options, batch_size=32, resume=True)
    straight, split = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert split["global_step"] == straight["global_step"] == 4
    # Every parameter and buffer of the whole method (online and target networks, queues, centre, BN
    # statistics), not only the exported encoder, must equal the uninterrupted run's.
    assert straight["state_dict"].keys() == split["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.allclose(value.float(), split["state_dict"][key].float(), atol=1e-6), key
    exported = [load_file(str(tmp_path / name / "encoder.safetensors")) for name in ("straight", "split")]
    for key in exported[0]:
        assert torch.equal(exported[0][key], exported[1][key]), key


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path, scenes):
    _run(tmp_path, "a", scenes, "simclr", RESNET, 1)
    assert (tmp_path / "a" / LAST_CHECKPOINT).is_file()
    with pytest.raises(SslbenchError, match="--resume"):
        _run(tmp_path, "a", scenes, "simclr", RESNET, 1)
    with pytest.raises(SslbenchError, match="does not exist"):
        _run(tmp_path, "b", scenes, "simclr", RESNET, 1, resume=True)
    assert not (tmp_path / "b").exists()


def test_resume_with_other_settings_than_the_run_refuses_naming_the_setting(tmp_path, scenes):
    _run(tmp_path, "a", scenes, "simclr", RESNET, 2, stop_after=1, lr=0.1)
    with pytest.raises(ConfigError, match=r"last.ckpt was trained with train.lr=0.1 and this command gives 0.2; resume with"):
        _run(tmp_path, "a", scenes, "simclr", RESNET, 2, resume=True, lr=0.2)
    with pytest.raises(ConfigError, match=r"train.batch_size=64 and this command gives 32"):
        _run(tmp_path, "a", scenes, "simclr", RESNET, 2, resume=True, lr=0.1, batch_size=32)
    with pytest.raises(ConfigError, match=r"options.temperature=0.5 and this command gives 0.2"):
        _run(tmp_path, "a", scenes, "simclr", RESNET, 2, resume=True, lr=0.1, options={"temperature": 0.2})
    # The run's own settings resume it.
    assert len(_run(tmp_path, "a", scenes, "simclr", RESNET, 2, resume=True, lr=0.1).epoch_losses) == 1


def test_a_run_from_before_final_lr_scale_resumes_only_with_the_decay_to_0_it_trained_with(tmp_path, scenes):
    _run(tmp_path, "a", scenes, "simclr", RESNET, 2, stop_after=1)
    last = tmp_path / "a" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    del checkpoint["hyper_parameters"]["train"]["final_lr_scale"]  # as written before the setting existed
    torch.save(checkpoint, last)
    with pytest.raises(ConfigError, match=r"trained with train.final_lr_scale=0.0 and this command gives 1.0"):
        _run(tmp_path, "a", scenes, "simclr", RESNET, 2, resume=True, final_lr_scale=1.0)
    assert len(_run(tmp_path, "a", scenes, "simclr", RESNET, 2, resume=True).epoch_losses) == 1


def test_nan_loss_stops_with_a_clear_error(tmp_path, scenes):
    with pytest.raises(SslbenchError, match="loss became nan.*lower the learning rate"):
        _run(tmp_path, "nan", scenes, "simclr", RESNET, 1, lr=1e30)


@pytest.mark.parametrize("nan_step", [1, 2])
def test_a_nan_loss_is_caught_one_step_late_but_before_the_epoch_is_saved(tmp_path, small_scenes, monkeypatch, nan_step):
    # Two steps an epoch. Step 1 ends epoch 0: its loss is checked at once, before the epoch-end export and
    # checkpoint. Step 2 opens epoch 1: its loss is checked when step 3 starts, so the error still names step 2.
    simclr = METHODS["simclr"]
    original, steps = simclr.training_loss, []

    def training_loss(self, images, generator):
        steps.append(self.global_step)
        loss, logs = original(self, images, generator)
        return (loss * float("nan") if self.global_step == nan_step else loss), logs

    monkeypatch.setattr(simclr, "training_loss", training_loss)
    saved = Path(tmp_path / "nan" / LAST_CHECKPOINT)
    with pytest.raises(SslbenchError, match=rf"loss became nan at step {nan_step} \(epoch {nan_step // 2}\)"):
        _run(tmp_path, "nan", small_scenes, "simclr", RESNET, 2, batch_size=32)
    # Step 3's forward is queued before the host reads step 2's loss.
    assert steps == ([0, 1] if nan_step == 1 else [0, 1, 2, 3])
    if nan_step == 1:
        assert not saved.exists()  # epoch 0 never completed
    else:
        state = torch.load(saved, map_location="cpu", weights_only=False)
        assert state["epoch"] == 0 and all(v.isfinite().all() for v in state["state_dict"].values() if v.is_floating_point())


def test_bad_options_fail_before_anything_is_written(tmp_path, scenes):
    with pytest.raises(ConfigError, match="unknown option 'temprature'"):
        pretrain("simclr", scenes, RunConfig(out=tmp_path / "x", progress=False), options={"temprature": "0.1"})
    with pytest.raises(ConfigError, match="batch size 1024 is larger"):
        _run(tmp_path, "x", scenes, "simclr", RESNET, 1, batch_size=1024)
    with pytest.raises(ConfigError, match="unknown method"):
        pretrain("simclrr", scenes, RunConfig(out=tmp_path / "x", progress=False))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("native_bf16, precision, warns", [(False, "bf16-mixed", True), (False, "bf16-true", True),
                                                          (True, "bf16-mixed", False), (False, "32-true", False)])
def test_bf16_on_a_cpu_without_bf16_kernels_warns_and_names_the_fix(tmp_path, monkeypatch, native_bf16, precision, warns):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native_bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = engine.make_trainer(RunConfig(out=tmp_path, accelerator="cpu", precision=precision, progress=False), 1, [])
    slow = [str(w.message) for w in caught if "no native bf16" in str(w.message)]
    assert trainer.precision == precision
    assert slow == ([f"--precision {precision} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native bf16) "
                     "runs convolutions in PyTorch's slow reference path, several times slower than fp32; "
                     "use --precision 32-true here"] if warns else [])


def test_models_with_a_narrow_strided_pointwise_conv_train_contiguous_on_the_cpu(tmp_path, small_scenes):
    """oneDNN's AVX2 weight gradient of such a convolution corrupts the heap in channels_last (engine docstring)."""
    narrow = {"backbone": "resnet18", "width": 0.0625, "stem": "cifar"}  # 4/8/16/32 channels: a 4 -> 8 shortcut
    assert engine.cpu_channels_last_hazard(build_encoder(narrow)) == "stages.1.0.shortcut.0"
    assert engine.cpu_channels_last_hazard(build_encoder(RESNET)) is None  # 8/16/32/64: an 8 -> 16 shortcut
    layouts = {}

    class RecordLayout(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            layouts[name] = pl_module.encoder.stem[0].weight.is_contiguous(memory_format=torch.channels_last)

    for name, backbone in (("narrow", narrow), ("wide", RESNET)):
        pretrain("simclr", small_scenes, RunConfig(out=tmp_path / name, accelerator="cpu", progress=False), backbone=backbone,
                 train={"epochs": 1, "batch_size": 32}, callbacks=[RecordLayout()])
    assert layouts == {"narrow": False, "wide": True}


def test_cpu_training_keeps_freed_memory_for_reuse(tmp_path, small_scenes, monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "reuse_freed_cpu_memory", lambda: calls.append(True) or True)
    pretrain("simclr", small_scenes, RunConfig(out=tmp_path / "run", accelerator="cpu", progress=False),
             backbone=RESNET, train={"epochs": 1, "batch_size": 32})
    assert calls == [True]


def test_batches_are_gathered_on_the_device_the_data_lives_on():
    # "meta" stands in for a GPU (CI has none): the same code path moves images, masks and the permutation.
    images = torch.arange(6 * 3 * 2 * 2, dtype=torch.uint8).reshape(6, 3, 2, 2)
    masks = torch.zeros(6, 2, 2, dtype=torch.uint8)
    host = ShuffledBatches(images, 2, seed=0, masks=masks)
    expected = host[1][0]
    dataset = ShuffledBatches(images, 2, seed=0, masks=masks)

    class FakeTrainer:
        class strategy:
            root_device = torch.device("meta")

    DataOnDevice(dataset).on_train_start(FakeTrainer(), None)
    batch, batch_masks = dataset[1]
    assert batch.device.type == batch_masks.device.type == "meta" and batch.shape == expected.shape
    dataset.set_epoch(3)  # a new epoch's permutation is drawn on the host, as before, and kept on the device
    assert dataset.order.device.type == "meta" and dataset.order.shape == (6,)


def test_data_moves_to_the_gpu_only_when_it_takes_at_most_a_quarter_of_it():
    assert data_fits_on_device(150_000_000, 80 * 2**30)  # CIFAR-10 on an H100
    assert not data_fits_on_device(30 * 2**30, 80 * 2**30)
    assert not RunConfig(out=Path("x"), data_on_device=False).data_on_device


VIT_BLOCKS = {f"encoder.blocks.{i}" for i in range(VIT_PRESETS["tiny"]["depth"])}


@pytest.mark.parametrize("method, backbone, compiled", [
    ("ddae", "unet-tiny", {"encoder.unet"}), ("simclr", "resnet18", {"encoder"}),
    # MAE and BEiT run the ViT through forward_tokens, iGPT its transformer on tokens: the encoders' forward is unused.
    ("mae", None, VIT_BLOCKS | {"decoder"}), ("beit_palette", None, VIT_BLOCKS), ("igpt", None, {"encoder.transformer"})])
def test_compile_compiles_what_the_training_step_calls_and_keeps_parameter_names(method, backbone, compiled):
    from sslbench.backbones import backbone_spec
    from sslbench.methods.base import TrainConfig

    cls = METHODS[method]
    module = cls(backbone_spec(backbone) if backbone else dict(cls.default_backbone), cls.Options(), TrainConfig(), 16, 2)
    names = list(module.state_dict())
    engine.compile_for_training(module)
    # DDAE's loss calls the U-Net, not the encoder's readout forward: compiling the encoder alone left it eager.
    compiled_now = {name for name, part in module.named_modules() if part._compiled_call_impl is not None}
    assert compiled_now == compiled
    assert list(module.state_dict()) == names  # checkpoints and exports read the same with and without --compile
