"""The DDAE readout study: raw/EMA weights, one U-Net pass per level, the (t, block) grid, the CLI command."""

import json
import shutil

import pytest
import torch
from PIL import Image

from sslbench.backbones import build_encoder
from sslbench.backbones.diffusion import DiffusionEncoder, EDMSchedule
from sslbench.backbones.unet import UNET_PRESETS, UNet
from sslbench.data import load_dataset
from sslbench.data.base import ImageSet
from sslbench.diffusion_study import (StudyCell, extract_blocks, load_diffusion_encoder, run_study, select_readout, study_grid, study_levels,
                                      study_rows)
from sslbench.engine import ENCODER_SPEC, ENCODER_WEIGHTS, LAST_CHECKPOINT, RunConfig, export_encoder, pretrain
from sslbench.errors import ConfigError, SslbenchError
from sslbench.tasks import ProbeConfig
from sslbench.tasks.heads import linear_task_head
from sslbench.tasks.probe import CachedFeatures, fit_cached


@pytest.fixture(scope="module")
def ddae_run(tmp_path_factory):
    """A tiny DDAE run at 16 px: 2 epochs of 2 steps, so raw and EMA weights differ."""
    out = tmp_path_factory.mktemp("study") / "ddae"
    images = load_dataset("scenes", None, "train", image_size=16, limit=32).images
    torch.set_num_threads(1)
    pretrain("ddae", images, RunConfig(out=out, progress=False), options={"unet": "tiny"},
             train={"epochs": 2, "batch_size": 16, "lr": 2e-3})
    return out


def random_encoder(schedule=None, t=11) -> DiffusionEncoder:
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS["tiny"])
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.2)
    return DiffusionEncoder(unet, t=t, block="mid", schedule=schedule)


def two_colour_images(count: int) -> ImageSet:
    """Class 0 dark, class 1 bright (plus pixel noise): any sensible readout separates them."""
    generator = torch.Generator().manual_seed(count)
    labels = torch.arange(count) % 2
    base = torch.where(labels.view(-1, 1, 1, 1) == 1, 200.0, 50.0)
    images = (base + 30 * torch.randn(count, 3, 16, 16, generator=generator)).clamp(0, 255).to(torch.uint8)
    return ImageSet("two-colours", images, {"class": labels}, {"class": 2})


def test_raw_and_ema_weights_come_from_the_run(ddae_run, tmp_path):
    ema, meta = load_diffusion_encoder(ddae_run, "ema")
    raw, _ = load_diffusion_encoder(ddae_run, "raw")
    assert meta["method"] == "ddae"
    state = torch.load(ddae_run / LAST_CHECKPOINT, weights_only=True)["state_dict"]
    for name, value in raw.unet.state_dict().items():
        assert torch.equal(value, state[f"encoder.unet.{name}"]), name
        assert torch.equal(ema.unet.state_dict()[name], state[f"ema_unet.{name}"]), name
    assert not torch.equal(raw.unet.conv_in.weight, ema.unet.conv_in.weight)
    # The exported folder alone (no last.ckpt) has EMA weights only.
    exported = tmp_path / "exported"
    exported.mkdir()
    for name in (ENCODER_SPEC, ENCODER_WEIGHTS):
        shutil.copy(ddae_run / name, exported / name)
    assert load_diffusion_encoder(exported, "ema")[0].t == 11
    with pytest.raises(SslbenchError, match="has no last.ckpt, which holds the raw weights"):
        load_diffusion_encoder(exported, "raw")
    with pytest.raises(ConfigError, match="--weights 'online' is not allowed"):
        load_diffusion_encoder(ddae_run, "online")


def test_a_non_diffusion_checkpoint_is_refused(tmp_path):
    export_encoder(build_encoder({"backbone": "resnet18", "width": 0.125, "stem": "cifar"}), tmp_path / "resnet", {"method": "simclr"})
    with pytest.raises(ConfigError, match="holds a resnet18 encoder; probe-diffusion needs"):
        load_diffusion_encoder(tmp_path / "resnet")


def test_extract_blocks_reads_every_block_from_one_pass_per_batch():
    encoder = random_encoder()
    passes = []
    encoder.unet.conv_in.register_forward_hook(lambda *_: passes.append(1))
    images = two_colour_images(10)
    blocks = ["down0.0", "mid", "up1.1", "up0.0"]
    cached = extract_blocks(encoder, images, blocks, batch_size=4, device="cpu", maps=True)
    assert len(passes) == 3  # 10 images in batches of 4: three passes for all four blocks
    for name in blocks:
        stride, channels = encoder.unet.block_stride(name), encoder.unet.block_channels(name)
        assert cached[name].pooled.shape == (10, channels)
        assert list(cached[name].maps) == [stride] and cached[name].maps[stride].shape == (10, channels, 16 // stride, 16 // stride)
        with torch.no_grad():
            direct = encoder.read_blocks(images.images[:4].float() / 255, [name])[name]
        assert torch.allclose(cached[name].pooled[:4], direct.mean((2, 3)), atol=1e-5)
    assert cached["mid"].maps[4].dtype == torch.float16
    assert extract_blocks(encoder, images, ["mid"], batch_size=4, device="cpu", maps=False)["mid"].maps == {}


@pytest.mark.parametrize("head", ["linear", "conv", "knn"])
def test_study_scores_every_cell_with_one_extraction_per_level(head):
    encoder = random_encoder()
    passes = []
    encoder.unet.conv_in.register_forward_hook(lambda *_: passes.append(1))
    train, test = two_colour_images(40), two_colour_images(20)
    config = ProbeConfig(epochs=30, batch_size=64, dense_batch_size=64, lr=1e-2, knn_k=5, decoder_width=8)
    cells = run_study(encoder, train, test, [0, 11], ["in", "mid", "up0.0"], head, config)
    assert [(c.t, c.block) for c in cells] == [(t, b) for t in (0, 11) for b in ("in", "mid", "up0.0")]
    assert len(passes) == 2 * 2  # per level: one pass over the train images and one over the test images
    assert encoder.t == 11  # restored
    # Brightness is linear in the input conv's pooled output: every head separates the classes there.
    assert all(c.top1 == 1.0 for c in cells if c.block == "in")
    assert all(0.0 <= c.top1 <= 1.0 and c.seconds >= 0 for c in cells)


def test_study_rejects_bad_grids():
    encoder, images = random_encoder(), two_colour_images(8)
    with pytest.raises(ConfigError, match="unknown U-Net block 'middle'"):
        run_study(encoder, images, images, [0], ["middle"], "linear", ProbeConfig())
    with pytest.raises(ConfigError, match="--head 'mlp' is not allowed"):
        run_study(encoder, images, images, [0], ["mid"], "mlp", ProbeConfig())
    with pytest.raises(ConfigError, match="t=1001 is out of range"):
        run_study(encoder, images, images, [1001], ["mid"], "linear", ProbeConfig())
    unlabelled = ImageSet("folder", images.images)
    with pytest.raises(ConfigError, match="no class labels"):
        run_study(encoder, unlabelled, unlabelled, [0], ["mid"], "knn", ProbeConfig())


def test_readout_levels_from_the_command_line():
    ddpm, edm = random_encoder(), random_encoder(EDMSchedule(), t=0.047)
    assert study_levels(ddpm, None, None, False) == [0, 11, 50, 100]
    assert study_levels(ddpm, "0, 5,250", None, False) == [0, 5, 250]
    assert study_levels(ddpm, None, None, True) == [0]
    # EDM defaults: the noise levels of the DDPM defaults, sqrt((1 - abar) / abar).
    assert study_levels(edm, None, None, False) == [0.0, 0.047, 0.173, 0.339]
    assert study_levels(edm, None, "0.1,2", False) == [0.1, 2.0]
    with pytest.raises(ConfigError, match="an EDM \\(ddae_edm\\) model; give its readout levels with --sigmas"):
        study_levels(edm, "11", None, False)
    with pytest.raises(ConfigError, match="a DDPM \\(ddae\\) model; give its readout levels with --timesteps"):
        study_levels(ddpm, None, "0.1", False)
    with pytest.raises(ConfigError, match="either --no-noise"):
        study_levels(ddpm, "11", None, True)
    with pytest.raises(ConfigError, match="not comma-separated numbers"):
        study_levels(ddpm, "11;50", None, False)
    with pytest.raises(ConfigError, match="use an integer"):
        study_levels(ddpm, "1.5", None, False)


def test_grid_has_blocks_as_rows_levels_as_columns_and_marks_the_best():
    cells = [StudyCell(0, "mid", 0.5, 1.0), StudyCell(0, "up2.2", 0.7, 1.0),
             StudyCell(11, "mid", 0.9, 1.0), StudyCell(11, "up2.2", 0.8, 1.0)]
    header, body = study_grid(cells)
    assert header == ["block \\ t", "0", "11"]
    assert body == [["mid", "0.500", "0.900*"], ["up2.2", "0.700", "0.800"]]
    header, body = study_grid([StudyCell(0.047, "mid", 0.3, 0.0)])
    assert header == ["block \\ t", "0.047"] and body == [["mid", "0.300*"]]


def test_rows_carry_t_block_and_weights():
    common = {"checkpoint": "runs/ddae", "dataset": "cifar10", "task": "classification", "protocol": "linear", "seed": 0, "epochs": 5}
    rows = study_rows([StudyCell(11, "up2.2", 0.9, 2.5)], common, "ddae", "raw")
    assert rows == [{**common, "method": "ddae raw t=11 up2.2", "metric": "top1", "value": 0.9, "seconds": 2.5,
                     "t": 11, "block": "up2.2", "weights": "raw"}]


def test_probe_optimizer_choice():
    torch.manual_seed(0)
    features = CachedFeatures(pooled=torch.randn(32, 8), maps={}, image_size=(1, 1))
    labels = (features.pooled[:, 0] > 0).long()
    weights = {}
    for optimizer in ("adam", "adamw"):
        torch.manual_seed(1)
        head = linear_task_head(8, 2)
        fit_cached(head, features, labels, torch.nn.functional.cross_entropy,
                   ProbeConfig(epochs=3, batch_size=8, lr=1e-2, weight_decay=0.5, optimizer=optimizer))
        weights[optimizer] = head.module.linear.weight.detach().clone()
    # Adam adds the decay to the gradient (then normalises it away), AdamW shrinks the weights directly.
    assert not torch.allclose(weights["adam"], weights["adamw"])
    with pytest.raises(ConfigError, match="probe optimizer 'sgd' is not allowed; use one of adamw, adam"):
        ProbeConfig(optimizer="sgd")


def test_probe_diffusion_command_appends_a_row_per_cell_and_prints_the_grid(run_cli, monkeypatch, capsys, ddae_run, tmp_path):
    out = tmp_path / "study"
    code, stdout, err = run_cli("probe-diffusion", "--checkpoint", ddae_run, "--timesteps", "0,11",
                                "--blocks", "mid,up1.0", "--weights", "raw", "--head", "linear", "--optimizer", "adam",
                                "--image-size", "16", "--train-limit", "40", "--test-limit", "20", "--probe-epochs", "2",
                                "--device", "cpu", "--out", out)
    assert code == 0, err
    assert "block \\ t" in stdout and stdout.count("*") == 1 + stdout.count("(* best)")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(row["t"], row["block"]) for row in rows] == [(0, "mid"), (0, "up1.0"), (11, "mid"), (11, "up1.0")]
    assert all(row["weights"] == "raw" and row["optimizer"] == "adam" and row["protocol"] == "linear"
               and row["formulation"] == "ddpm" and row["train_size"] == 40 for row in rows)


@pytest.mark.parametrize("args,message", [
    (["--head", "mlp"], "--head 'mlp' is not allowed"),
    (["--weights", "online"], "--weights 'online' is not allowed"),
    (["--optimizer", "sgd"], "probe optimizer 'sgd' is not allowed"),
    (["--sigmas", "0.1"], "give its readout levels with --timesteps"),
    (["--blocks", "mid,middle", "--train-limit", "4", "--test-limit", "4"], "unknown U-Net block 'middle'"),
])
def test_bad_study_input_is_one_line_exit_2(run_cli, monkeypatch, capsys, ddae_run, tmp_path, args, message):
    out = tmp_path / "out"
    code, _, err = run_cli("probe-diffusion", "--checkpoint", ddae_run, *args, "--out", out)
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()


def test_a_folder_without_class_subfolders_is_refused(run_cli, monkeypatch, capsys, ddae_run, tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 20, 30)).save(folder / f"{i}.png")
    code, _, err = run_cli("probe-diffusion", "--checkpoint", ddae_run, "--data", "folder",
                           "--data-root", folder, "--blocks", "mid", "--out", tmp_path / "out")
    assert code == 2 and "has no class labels; probe-diffusion needs a classification dataset" in err and err.count("\n") == 1


def test_pretrain_help_names_the_35_7m_parameter_preset(run_cli, monkeypatch, capsys):
    with torch.device("meta"):
        count = sum(p.numel() for p in UNet(UNET_PRESETS["ddpm_cifar10"]).parameters())
    code, stdout, _ = run_cli("pretrain", "--help")
    assert code == 0
    assert f"{count / 1e6:.1f}M-parameter" in " ".join(stdout.split())


def test_select_readout_takes_the_best_validation_cell_never_the_test_set():
    encoder = random_encoder()
    train = two_colour_images(40)
    config = ProbeConfig(knn_k=5)
    chosen, cells = select_readout(encoder, train, [0.0, 50.0], ["mid", "up1.1", "up0.1"], config)
    assert len(cells) == 6
    best = max(cells, key=lambda cell: cell.top1)
    assert (chosen.t, chosen.block) == (best.t, best.block)
    assert chosen.unet is encoder.unet and chosen.pyramid_blocks == encoder.pyramid_blocks
    assert chosen.pooled_dim == encoder.unet.block_channels(best.block)
    # The cells are scored on the last quarter of train: the same as a study with that split.
    again = run_study(encoder, train.subset(slice(0, 30)), train.subset(slice(30, None)), [0.0, 50.0],
                      ["mid", "up1.1", "up0.1"], "knn", config)
    assert [cell.top1 for cell in again] == [cell.top1 for cell in cells]
    assert encoder.t == 11 and encoder.block == "mid"  # the original encoder is left as it was
    with pytest.raises(ConfigError, match="validation_fraction"):
        select_readout(encoder, train, [0.0], ["mid"], config, validation_fraction=1.0)
