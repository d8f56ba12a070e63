"""benchmarks/ddae_vs_diffusers.py: the two U-Nets match, diffusers' blocks are read like sslbench's, and both
training workers run one epoch through the parent's pipe protocol."""

import dataclasses
import sys

import numpy as np
import pytest
import torch

from sslbench.backbones.unet import UNET_PRESETS, UNet
from sslbench.data import ImageSet

@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("ddae_vs_diffusers")


class FakePipe:
    """The worker's end of the parent's pipe: every recv() says go, every send() is kept."""

    def __init__(self):
        self.sent = []

    def recv(self) -> str:
        return "go"

    def send(self, item) -> None:
        self.sent.append(item)


def test_diffusers_unet_has_the_small_presets_size_and_block_shapes(bench):
    ours = UNet(UNET_PRESETS["small"])
    theirs = bench.diffusers_unet()
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters()) == 1_113_955
    readout = bench.DiffusersReadout(theirs.eval(), t=11)
    with torch.no_grad():
        blocks = readout.read_blocks(torch.rand(2, 3, 32, 32), list(bench.BLOCKS))
    for name in bench.BLOCKS:
        stride = ours.block_stride(name)
        assert readout.unet.block_stride(name) == stride
        assert blocks[name].shape == (2, ours.block_channels(name), 32 // stride, 32 // stride)
    assert all(not module._forward_hooks for module in theirs.modules())  # the hooks are gone after the read


def test_diffusers_readout_noises_like_sslbench(bench):
    """At t = 51 the hooked model sees sqrt(abar[50]) x + sqrt(1 - abar[50]) eps with eps from a generator seeded 0,
    at timestep 50: the input sslbench's own readout gives its U-Net."""
    torch.manual_seed(0)
    model = bench.diffusers_unet().eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        read = bench.DiffusersReadout(model, t=51).read_blocks(images, ["mid"])["mid"]
        x = images * 2 - 1
        abar = bench.DDPMSchedule().alphas_cumprod[50]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        seen = {}
        handle = model.mid_block.register_forward_hook(lambda module, inputs, output: seen.setdefault("mid", output))
        model(abar.sqrt() * x + (1 - abar).sqrt() * noise, torch.full((3,), 50))
        handle.remove()
    torch.testing.assert_close(read, seen["mid"])
    with torch.no_grad():
        other_seed = bench.DiffusersReadout(model, t=51, noise_seed=1).read_blocks(images, ["mid"])["mid"]
    assert not torch.allclose(other_seed, read)


def test_readout_encoder_loads_the_state_a_worker_sends(bench):
    torch.manual_seed(3)
    trained = bench.diffusers_unet()
    state = {name: value.numpy().copy() for name, value in trained.state_dict().items()}
    loaded = bench.readout_encoder("diffusers", state)
    assert torch.equal(loaded.unet.model.conv_in.weight, trained.conv_in.weight)
    assert not loaded.training
    random_init = bench.readout_encoder("diffusers", None)
    assert not torch.equal(random_init.unet.model.conv_in.weight, trained.conv_in.weight)


@pytest.mark.parametrize("library", ["sslbench", "diffusers"])
def test_random_init_is_drawn_with_the_runs_seed(bench, library):
    """The random-init floor of a ``--seed 1`` run is another init than seed 0's, the same one every time."""
    def first_weight(seed: int) -> torch.Tensor:
        encoder = bench.readout_encoder(library, None, seed=seed)
        return next(p for p in encoder.parameters() if p.dim() == 4).detach().clone()

    assert torch.equal(first_weight(1), first_weight(1))
    assert not torch.equal(first_weight(0), first_weight(1))


@pytest.fixture
def tiny_images(bench, monkeypatch):
    """128 random uint8 images (one batch) instead of CIFAR-10, for both workers."""
    images = ImageSet(name="cifar10", images=torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8),
                      targets={"class": torch.arange(128) % 10}, num_classes={"class": 10})
    speed_vs_lightly = sys.modules["speed_vs_lightly"]
    monkeypatch.setattr(bench, "training_images", lambda settings: images)
    monkeypatch.setattr(speed_vs_lightly, "training_images", lambda settings: images)
    return images


def _settings(bench, tmp_path, precision: str):
    """Settings for one epoch of 128 images. Tests pass ``bench.engine_precision("auto")``: bf16 where the CPU has
    bf16 kernels; elsewhere fp32, because bf16 convolutions then take PyTorch's reference path (minutes a step)."""
    return bench.SideBySideSettings(tmp_path, 1, 128, 1, tmp_path / "runs", method="ddae", recipe=bench.RECIPE,
                                    precision=precision, knn_at=(), diffusers_precision=precision)


def test_diffusers_worker_trains_an_epoch_and_sends_the_ema_weights(bench, tiny_images, tmp_path):
    pipe = FakePipe()
    bench.diffusers_worker(_settings(bench, tmp_path, bench.engine_precision("auto")), pipe)
    (report,) = pipe.sent
    assert report.images == 128 and report.seconds > 0
    assert 0.5 < report.loss < 1.5  # one step from init: the MSE of a near-zero noise prediction, about E[eps^2] = 1
    expected = bench.diffusers_unet().state_dict()
    assert set(report.encoder_state) == set(expected)
    assert all(isinstance(value, np.ndarray) for value in report.encoder_state.values())


def test_sslbench_worker_runs_ddae_with_the_settings_recipe_and_precision(bench, tiny_images, tmp_path, monkeypatch):
    import sslbench.engine

    runs = []
    real_pretrain = sslbench.engine.pretrain

    def recording_pretrain(method, images, run, **kwargs):
        runs.append(run)
        return real_pretrain(method, images, run, **kwargs)

    monkeypatch.setattr(sslbench.engine, "pretrain", recording_pretrain)
    pipe = FakePipe()
    precision = bench.engine_precision("auto")
    bench.sslbench_worker(_settings(bench, tmp_path, precision), pipe)
    assert [run.precision for run in runs] == [precision]
    (report,) = pipe.sent
    assert report.images == 128 and 0.5 < report.loss < 1.5
    encoder = bench.readout_encoder("sslbench", report.encoder_state)
    assert encoder.unet.config == dataclasses.replace(UNET_PRESETS["small"], init="pytorch")
    meta = (tmp_path / "runs" / "sslbench" / "encoder.json").read_text()
    assert '"method": "ddae"' in meta and '"lr": 0.0002' in meta


def test_knn_epochs_follow_the_settings(bench, tmp_path):
    speed_vs_lightly = sys.modules["speed_vs_lightly"]
    simclr = speed_vs_lightly.Settings(tmp_path, 12, None, 1, tmp_path)
    assert speed_vs_lightly.knn_epochs(simclr) == [5, 10, 12]
    assert speed_vs_lightly.knn_epochs(_settings(bench, tmp_path, "32-true")) == [1]


def test_both_sides_start_from_pytorch_default_initialisation(bench):
    # Like for like: diffusers' layers keep PyTorch's defaults, so sslbench's side is built with init="pytorch".
    assert bench.RECIPE["backbone"]["unet"]["init"] == "pytorch"
    encoder = bench.readout_encoder("sslbench", None)
    assert torch.count_nonzero(encoder.unet.out.conv.weight) == encoder.unet.out.conv.weight.numel()


def test_the_lean_and_patched_unets_are_read_at_the_same_places(bench):
    small, lean = bench.recipe("small")["backbone"], bench.recipe("small-lean")["backbone"]
    assert small == bench.RECIPE["backbone"] and lean["unet"]["init"] == "pytorch"
    assert bench.readout_blocks("sslbench", small) == bench.readout_blocks("diffusers", small) == ("mid", "up1.1")
    assert bench.readout_blocks("sslbench", lean) == ("mid", "up1.0")
    encoder = bench.readout_encoder("sslbench", None, lean)
    assert encoder.unet.block_stride("up1.0") == 2 and bench.parameter_count("sslbench", lean) == 754_531
    fast = bench.recipe("small-fast")["backbone"]
    assert fast["unet"] == {**lean["unet"], "decoder_kernel": 1} and bench.readout_blocks("sslbench", fast) == ("mid", "up1.0")
    # On 2x2 patches the stride-2 maps are level 0's: the last of its decoder ResBlocks is read.
    patched = bench.recipe("small-p2")["backbone"]
    assert patched["unet"] == {**small["unet"], "patch_size": 2, "attention_resolutions": [8]}
    assert bench.parameter_count("sslbench", patched) == 1_119_148
    assert bench.readout_blocks("sslbench", patched) == ("mid", "up0.1")
    assert bench.readout_encoder("sslbench", None, patched).unet.block_stride("up0.1") == 2


def test_auto_precision_takes_bf16_only_where_the_cpu_has_native_bf16_kernels(bench, monkeypatch):
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: True)
    assert bench.engine_precision("auto") == "bf16-mixed"
    assert bench.engine_precision("32-true") == "32-true"
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: False)
    assert bench.engine_precision("auto") == "32-true"
    assert bench.engine_precision("bf16-mixed") == "bf16-mixed"  # asked for by name: the engine warns, the run goes on


def test_the_seed_reaches_the_sslbench_run(bench, tiny_images, tmp_path, monkeypatch):
    import sslbench.engine

    seeds = []
    monkeypatch.setattr(sslbench.engine, "pretrain", lambda method, images, run, **kwargs: seeds.append(kwargs["train"]["seed"]))
    bench.sslbench_worker(_settings(bench, tmp_path, "32-true"), FakePipe())
    bench.sslbench_worker(dataclasses.replace(_settings(bench, tmp_path, "32-true"), seed=3), FakePipe())
    assert seeds == [0, 3]


def test_the_seed_reaches_the_diffusers_loop(bench, tiny_images, tmp_path):
    # The seed sets diffusers' initial weights, batch order, flips, timesteps and noise: runs with one seed agree.
    states = []
    for seed in (0, 0, 1):
        pipe = FakePipe()
        bench.diffusers_worker(dataclasses.replace(_settings(bench, tmp_path, "32-true"), seed=seed), pipe)
        states.append(pipe.sent[0].encoder_state["conv_in.weight"])
    assert np.array_equal(states[0], states[1]) and not np.array_equal(states[0], states[2])


@pytest.mark.parametrize("unet", ["small-lean", "small-fast", "small-p2"])
def test_the_report_names_every_difference_of_the_unet(bench, unet):
    grid = [{"t": t, "block": block, "top1": 0.3, "seconds": 1.0} for t in bench.LEVELS for block in ("mid", "up1.0")]
    side = {"parameters": 1000, "blocks": ["mid", "up1.0"], "precision": "32-true", "epoch_seconds": [1.0], "images_per_second": 10.0,
            "seconds_per_epoch": 1.0, "peak_rss_mb": 100.0, "losses": [0.2], "final_loss": 0.2, "extraction_images_per_second": 20.0,
            "grid": grid, "best": grid[0], "random_init_top1": 0.28}
    report = {"protocol": "C10-mini DDAE", "command": "python x", "machine": "m", "versions": "v", "date": "d", "unet": unet,
              "bank": 10, "queries": 10, "floors": {"raw pixels": 0.35}, "models": {"sslbench": side, "diffusers": side}}
    text = bench.markdown_report(report)
    lines = bench.DIFFERENCES[unet]
    # Each line of the difference appears once, in order, and the recipe sentence follows the last.
    assert all(text.count(line) == 1 for line in lines)
    assert text.index(lines[-1] + " Same seed, images, batch order") > max(text.index(line) for line in lines[:-1])
