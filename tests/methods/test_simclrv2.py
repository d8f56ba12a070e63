"""SimCLRv2: SimCLR's NT-Xent with a 3-layer head whose first layer is exported with the encoder and is
where classification fine-tuning starts."""

import json

import pytest
import torch
from torch import nn

from sslbench.backbones.projected import ProjectedEncoder
from sslbench.data import load_dataset
from sslbench.engine import LAST_CHECKPOINT, RunConfig, export_encoder, load_encoder, pretrain
from sslbench.errors import ConfigError
from sslbench.evaluation import checkpoint_subject
from sslbench.methods import METHODS, TrainConfig
from sslbench.methods.parts import MLPHead, ScaleBatchNorm1d
from sslbench.methods.simclr import ntxent_loss
from sslbench.methods.simclrv2 import SimCLRv2, SimCLRv2Options
from sslbench.tasks import TASKS, ProbeConfig
from sslbench.tasks import base as task_base

RESNET = {"backbone": "resnet18", "width": 0.125, "stem": "cifar"}  # pooled width 64
HIDDEN = 48
"""A head width unlike the backbone's 64, so that a feature of width 48 can only come from the head layer."""


def _method(**options):
    return SimCLRv2(RESNET, SimCLRv2Options(**options), TrainConfig(), image_size=16, steps_per_epoch=1)


def _leaves(module):
    return [m for m in module.modules() if not list(m.children())]


def test_registered_with_the_paper_defaults():
    assert METHODS["simclrv2"] is SimCLRv2
    options = SimCLRv2Options()
    assert options.temperature == 0.2 and options.projection_layers == 3 and options.export_head_layers == 1


def test_head_has_three_layers_as_wide_as_the_encoder_with_bn_relu_on_the_hidden_ones():
    module = _method()
    assert [type(m) for m in _leaves(module.projection)] == [
        nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, ScaleBatchNorm1d]
    linears = [m for m in module.projection.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64), (64, 64), (64, 128)]
    assert all(m.bias is None for m in linears)  # every Linear is followed by a BatchNorm
    output_bn = module.projection[1][-1]  # the official head's output BatchNorm: a learned scale, no shift
    assert output_bn.weight.shape == (128,) and output_bn.weight.requires_grad and output_bn.bias is None
    assert [type(m) for m in module.projection[0]] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]  # the exported part
    assert module.projection(torch.randn(5, 64)).shape == (5, 128)
    assert _method(projection_hidden=HIDDEN).projection[0][0].out_features == HIDDEN


def test_split_head_is_the_plain_three_layer_mlp():
    module = _method().eval()
    whole = MLPHead([64, 64, 64, 128], last_bn=True).eval()
    state = module.projection.state_dict()
    assert [v.shape for v in whole.state_dict().values()] == [v.shape for v in state.values()]
    whole.load_state_dict(dict(zip(whole.state_dict(), state.values())))
    x = torch.randn(6, 64)
    assert torch.allclose(whole(x), module.projection(x))


def test_loss_is_simclrs_ntxent_on_the_projections(small_scenes):
    module = _method()
    images = small_scenes[:8]
    torch.manual_seed(0)
    loss, _ = module.training_loss(images, torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    v1, v2 = module.views(images, torch.Generator().manual_seed(3))
    z1, z2 = module.projection(module.encoder(torch.cat([v1, v2])).pooled).chunk(2)
    assert z1.shape == (8, 128)
    assert torch.allclose(loss, ntxent_loss(z1, z2, 0.2))


def test_training_lowers_the_loss(tmp_path):
    # The output BatchNorm removes what all images share, so two views of an image start nearly
    # orthogonal and the loss above chance (log(2 * 32 - 1) = 4.14); at this size the head only moves
    # within 48 steps with a high learning rate (the loss stays flat for ~150 steps at lr 0.06, and falls by
    # under 0.1 at lr 0.3 on these scenes; measured at lr 1.0: 5.30 -> 4.52).
    images = load_dataset("scenes", None, "train", limit=256, image_size=16).images
    result = pretrain("simclrv2", images, RunConfig(out=tmp_path / "run", progress=False), backbone=RESNET,
                      train={"epochs": 6, "batch_size": 32, "lr": 1.0})
    losses = result.epoch_losses
    assert losses[0] > 4.14 and losses[-1] < losses[0] - 0.3
    encoder, meta = load_encoder(tmp_path / "run")
    assert meta["method"] == "simclrv2" and meta["epochs"] == 6
    assert encoder(torch.rand(2, 3, 16, 16)).pooled.shape == (2, 64)


def test_export_wraps_the_live_head_layer_or_nothing(tmp_path):
    module = _method(projection_hidden=HIDDEN).eval()
    exported = module.export_encoder()
    assert isinstance(exported, ProjectedEncoder) and exported.encoder is module.encoder and exported.layers is module.projection[0]
    assert exported.pooled_dim == HIDDEN and exported.map_channels == module.encoder.map_channels
    export_encoder(exported, tmp_path, {"method": "simclrv2"})
    reloaded, _ = load_encoder(tmp_path)
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(reloaded(images).pooled, exported(images).pooled, atol=1e-6)
    assert _method(export_head_layers=0).export_encoder().spec["backbone"] == "resnet18"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, small_scenes):
    """A 1-epoch SimCLRv2 run with a 48-wide head; (its folder, the Lightning checkpoint's state dict)."""
    out = tmp_path_factory.mktemp("simclrv2") / "run"
    pretrain("simclrv2", small_scenes, RunConfig(out=out, progress=False), backbone=RESNET,
             options={"projection_hidden": HIDDEN}, train={"epochs": 1, "batch_size": 32})
    return out, torch.load(out / LAST_CHECKPOINT, map_location="cpu", weights_only=False)["state_dict"]


def test_checkpoint_subject_reads_the_first_head_layer(pretrained):
    out, state = pretrained
    subject = checkpoint_subject(out)
    encoder = subject.encoder
    assert subject.method == "simclrv2" and isinstance(encoder, ProjectedEncoder)
    assert encoder.spec == {"backbone": "projected", "encoder": {**RESNET, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                            "head_dims": [HIDDEN]}
    layer = encoder.layers
    assert [type(m) for m in layer] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert torch.equal(layer[0].weight, state["projection.0.0.weight"])
    assert torch.equal(layer[1].running_mean, state["projection.0.1.running_mean"])
    assert torch.equal(encoder.encoder.stem[0].weight, state["encoder.stem.0.weight"])
    images = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        features, backbone = encoder(images), encoder.encoder(images)
    assert features.pooled.shape == (4, HIDDEN) and (features.pooled >= 0).all()  # after the ReLU
    assert torch.allclose(features.pooled, layer(backbone.pooled))
    assert features.maps.keys() == backbone.maps.keys() and all(torch.equal(features.maps[s], backbone.maps[s]) for s in backbone.maps)


def test_few_label_finetune_starts_from_the_checkpoints_head_layer(pretrained, monkeypatch):
    out, state = pretrained
    subject = checkpoint_subject(out)
    calls = []
    real_finetune = task_base.finetune

    def spy(head, encoder, *args):
        start = {name: value.clone() for name, value in encoder.state_dict().items()}
        tuned = real_finetune(head, encoder, *args)
        calls.append((start, tuned))
        return tuned

    monkeypatch.setattr(task_base, "finetune", spy)
    train = load_dataset("scenes", None, "train", image_size=16, limit=64)
    test = load_dataset("scenes", None, "test", image_size=16, limit=16)
    result = TASKS["classification"]().evaluate(subject.encoder, train, test, "finetune-10pct", ProbeConfig(epochs=2, batch_size=16))
    (start, tuned), = calls
    assert torch.equal(start["layers.0.weight"], state["projection.0.0.weight"])
    assert isinstance(tuned, ProjectedEncoder) and tuned.layers[0].weight.shape == (HIDDEN, 64)
    assert not torch.equal(tuned.layers[0].weight, state["projection.0.0.weight"])  # trained with the backbone
    classes = train.num_classes["class"]
    encoder_params = sum(p.numel() for p in subject.encoder.parameters())
    assert encoder_params == sum(p.numel() for p in subject.encoder.encoder.parameters()) + 64 * HIDDEN + 2 * HIDDEN
    assert result["trainable_params"] == encoder_params + HIDDEN * classes + classes  # the linear head reads the 48-wide layer


@pytest.mark.parametrize("options,message", [
    ({"export_head_layers": 3}, r"export_head_layers=3 is out of range; use a value in \[0, 2\]"),
    ({"projection_layers": 1, "export_head_layers": 1}, r"export_head_layers=1 is out of range; use a value in \[0, 0\]"),
    ({"projection_hidden": 0}, "projection_hidden=0 is out of range"),
])
def test_bad_options_are_config_errors(tmp_path, small_scenes, options, message):
    with pytest.raises(ConfigError, match=message):
        pretrain("simclrv2", small_scenes, RunConfig(out=tmp_path / "bad", progress=False), backbone=RESNET,
                 options=options, train={"epochs": 1, "batch_size": 32})
    assert not (tmp_path / "bad").exists()


def test_cli_pretrains_simclrv2_and_evaluates_it_with_distillation(run_cli, monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    code, stdout, err = run_cli("pretrain", "--method", "simclrv2", "--backbone", "resnet18", "--width", "0.125",
                             "--image-size", "16", "--limit", "64", "--epochs", "1", "--batch-size", "32",
                             "--set", f"projection_hidden={HIDDEN}", "--out", run)
    assert code == 0, err
    assert "simclrv2: 1 epochs this run" in stdout
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["spec"]["backbone"] == "projected" and meta["options"]["export_head_layers"] == 1
    code, stdout, err = run_cli("eval", "--checkpoint", run, "--task", "classification", "--protocol", "distill-10pct",
                             "--image-size", "16", "--train-limit", "40", "--test-limit", "10", "--probe-epochs", "1", "--out", tmp_path)
    assert code == 0, err
    assert "simclrv2 classification/distill-10pct" in stdout and "teacher_top1=" in stdout
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["metric"] for row in rows] == ["top1", "teacher_top1"]
    assert all(row["protocol"] == "distill-10pct" and row["trainable_params"] > 0 and row["train_size"] == 40 for row in rows)
