import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from sslbench.backbones import backbone_spec
from sslbench.engine import RunConfig, load_encoder, pretrain
from sslbench.errors import ConfigError
from sslbench.methods import TrainConfig
from sslbench.methods.dino import (DINO, DINOHead, DINOOptions, NormalizedLinear, clip_gradients_per_parameter, dino_loss,
                                   update_center)

VIT = backbone_spec("vit-nano", image_size=16)  # global crops 16 px (4x4 patches), local crops 8 px (2x2)
SMALL_HEAD = {"hidden": 64, "bottleneck": 16, "prototypes": 32}


def test_dino_loss_on_two_by_two_toy_outputs():
    student = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    teacher = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    center = torch.tensor([1.0, 0.0])
    ts, tt = 0.5, 0.25

    def softmax(v, t):
        e = [math.exp(x / t) for x in v]
        return [x / sum(e) for x in e]

    # Teacher 0 (centred [1, 0]) teaches student view 1, teacher 1 (centred [-1, 0]) teaches student view 0.
    p0, p1 = softmax([1.0, 0.0], tt), softmax([-1.0, 0.0], tt)
    s0, s1 = softmax([1.0, 0.0], ts), softmax([0.0, 1.0], ts)
    expected = (-sum(a * math.log(b) for a, b in zip(p0, s1)) - sum(a * math.log(b) for a, b in zip(p1, s0))) / 2
    assert abs(dino_loss(student, teacher, center, ts, tt).item() - expected) < 1e-5


def test_dino_center_update_by_hand():
    center = torch.tensor([1.0, -1.0])
    teacher = torch.tensor([[0.0, 2.0], [4.0, 0.0]])  # batch mean [2, 1]
    new = update_center(center, teacher, 0.9)
    assert torch.allclose(new, torch.tensor([0.9 + 0.2, -0.9 + 0.1]))


def test_head_initialisation_follows_the_official_dino_head():
    torch.manual_seed(0)
    head = DINOHead(in_dim=64, hidden=512, bottleneck=256, prototypes=1024)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for layer in linears:  # trunc_normal(std 0.02), zero bias (DINOHead._init_weights)
        assert abs(layer.weight.std().item() - 0.02) < 0.001 and torch.count_nonzero(layer.bias) == 0
    # The last layer keeps nn.Linear's default U(-1/sqrt(256), 1/sqrt(256)) = U(-1/16, 1/16): std 1/(16 sqrt 3).
    weight = head.last_layer.weight
    assert weight.abs().max() <= 1 / 16 and abs(weight.std().item() - 1 / (16 * math.sqrt(3))) < 0.001


def test_normalized_linear_uses_unit_rows_whatever_the_stored_norm():
    layer = NormalizedLinear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))  # row norms 5 and 2
    out = layer(torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(out, torch.tensor([[0.6 + 0.8, -1.0]]))


def test_dino_training_lowers_the_loss(train_and_reload):
    # With a moving teacher the loss of eight tiny steps is no progress measure: it first drops as
    # student and teacher agree on a few prototypes, then rises as the centre spreads the teacher out.
    # With teacher and centre held fixed, the student (a ResNet, default clipping at 3.0, last layer
    # frozen in epoch 0) must learn to predict the sharpened teacher across views: the loss starts
    # near log 64 = 4.16 (a uniform student) and falls (measured 4.05 -> 3.21).
    options = {"hidden": 128, "bottleneck": 32, "prototypes": 64, "warmup_teacher_epochs": 0.0, "momentum_start": 1.0,
               "center_momentum": 1.0}
    losses = train_and_reload("dino", 4, options)
    assert losses[0] > 3.9
    assert losses[-1] < losses[0] - 0.5


def test_gradients_are_clipped_per_parameter_by_hand():
    big, small = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    big.grad, small.grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0])  # norms 5 and 1
    clip_gradients_per_parameter([big, small], 3.0)
    assert torch.allclose(big.grad, torch.tensor([1.8, 2.4]), atol=1e-5)  # rescaled to norm 3, same direction
    assert torch.equal(small.grad, torch.tensor([1.0]))  # a global-norm clip (norm 5.1) would shrink it too


def test_dino_with_a_vit_lowers_the_loss(tmp_path, small_scenes):
    # A ViT's early DINO loss rises while the centre catches up with the teacher; with the teacher and
    # the centre held fixed the student distils the teacher across views and resolutions (global crops
    # 4x4 patches, local 2x2 through the resized position table), with clipping and the frozen last
    # layer on, and the loss must fall (about 3.6 -> 2.8).
    options = {**SMALL_HEAD, "warmup_teacher_epochs": 0.0, "momentum_start": 1.0, "center_momentum": 1.0}
    result = pretrain("dino", small_scenes, RunConfig(out=tmp_path, progress=False), backbone=VIT, options=options,
                      train={"epochs": 3, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 0.0})
    assert result.epoch_losses[-1] < result.epoch_losses[0] - 0.25
    encoder, meta = load_encoder(tmp_path)
    assert meta["spec"]["backbone"] == "vit" and encoder(torch.rand(2, 3, 8, 8)).pooled.shape == (2, 64)


class _RecordLastLayer(Callback):
    """The student's last-layer weights at the start and after each epoch, and the largest gradient norm
    of a student parameter used by an optimiser step (after clipping; read once the step is done, since
    Lightning runs backward inside ``optimizer.step``). Gradients are first blown up 1000x so that
    clipping has something to do."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.largest_grad_norm = 0.0

    def on_train_start(self, trainer, module):
        self.weights.append(module.head.last_layer.weight.detach().clone())
        student = [*module.encoder.parameters(), *module.head.parameters()]

        def record(optimizer, args, kwargs):
            norms = [float(p.grad.norm()) for p in student if p.grad is not None]
            self.largest_grad_norm = max([self.largest_grad_norm, *norms])

        trainer.optimizers[0].register_step_post_hook(record)

    def on_after_backward(self, trainer, module):
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(1000.0)

    def on_train_epoch_end(self, trainer, module):
        self.weights.append(module.head.last_layer.weight.detach().clone())


def test_dino_vit_defaults_frozen_last_layer_and_clipping_in_training(tmp_path, small_scenes):
    record = _RecordLastLayer()
    pretrain("dino", small_scenes, RunConfig(out=tmp_path, progress=False), backbone=VIT, options=SMALL_HEAD,
             train={"epochs": 2, "batch_size": 32}, callbacks=[record])
    start, after_first, after_second = record.weights
    assert torch.equal(after_first, start)  # frozen during epoch 0 (freeze_last_layer_epochs=1)
    assert (after_second - after_first).abs().max() > 1e-6  # trained from epoch 1 on
    assert record.largest_grad_norm <= 3.0 + 1e-4  # every student gradient clipped to norm 3
    _, meta = load_encoder(tmp_path)
    # The official ViT recipe: AdamW, lr 0.0005 x 32 / 256, weight decay 0.04, warm-up over 10% of training.
    assert meta["train"]["optimizer"] == "adamw" and meta["train"]["lr"] == pytest.approx(6.25e-5)
    assert meta["train"]["weight_decay"] == 0.04 and meta["train"]["warmup_epochs"] == pytest.approx(0.2)


def test_without_clipping_the_gradients_stay_large(tmp_path, small_scenes):
    record = _RecordLastLayer()
    pretrain("dino", small_scenes, RunConfig(out=tmp_path, progress=False), backbone=VIT,
             options={**SMALL_HEAD, "clip_grad": 0.0}, train={"epochs": 1, "batch_size": 32}, callbacks=[record])
    assert record.largest_grad_norm > 3.0


def test_resnet_dino_keeps_its_sgd_defaults():
    assert DINO.derived_train_defaults({"backbone": "resnet18"}, TrainConfig()) == {}


def test_negative_clip_grad_is_a_config_error():
    with pytest.raises(ConfigError, match="clip_grad"):
        DINO(VIT, DINOOptions(**SMALL_HEAD, clip_grad=-1.0), TrainConfig(), image_size=16, steps_per_epoch=1)


def test_head_batch_norm_option_puts_bn_after_each_hidden_layer():
    torch.manual_seed(0)
    head = DINOHead(in_dim=64, hidden=128, bottleneck=32, prototypes=16, batch_norm=True)
    norms = [m for m in head.mlp if isinstance(m, nn.BatchNorm1d)]
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert len(norms) == 2 and [layer.bias is None for layer in linears] == [True, True, False]
    # Nearly parallel inputs (as a random ResNet's pooled vectors): BN spreads them, the plain head barely does.
    x = torch.ones(8, 64) + 0.01 * torch.randn(8, 64)
    plain = DINOHead(in_dim=64, hidden=128, bottleneck=32, prototypes=16)
    spread = lambda h: F.normalize(h.mlp(x), dim=1).std(0).sum().item()  # noqa: E731
    assert spread(head) > 10 * spread(plain)


@pytest.mark.parametrize("layers, widths", [(1, [(64, 32)]), (2, [(64, 128), (128, 32)]),
                                            (3, [(64, 128), (128, 128), (128, 32)])])
def test_head_layers_option_sets_the_mlp_depth(layers, widths):
    method = DINO({"backbone": "resnet18", "width": 0.125, "stem": "cifar"},  # pooled dim 64
                  DINO.Options(hidden=128, bottleneck=32, prototypes=16, head_layers=layers, head_batch_norm=True),
                  TrainConfig(), image_size=16, steps_per_epoch=2)
    assert method.encoder.pooled_dim == 64
    linears = [m for m in method.head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == widths
    assert sum(isinstance(m, nn.BatchNorm1d) for m in method.head.mlp) == layers - 1
    assert [(m.in_features, m.out_features) for m in method.teacher_head.mlp if isinstance(m, nn.Linear)] == widths


def test_zero_head_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="head_layers"):
        DINO(VIT, DINOOptions(**SMALL_HEAD, head_layers=0), TrainConfig(), image_size=16, steps_per_epoch=1)


def test_dino_blur_option_sets_each_views_blur():
    method = DINO({"backbone": "resnet18", "width": 0.125, "stem": "cifar"}, DINO.Options(local_views=2, blur_p=(0.0, 0.3, 0.2)),
                  TrainConfig(), image_size=16, steps_per_epoch=2)
    assert [v.blur_p for v in method.views.views] == [0.0, 0.3, 0.2, 0.2]
    assert [v.solarize_p for v in method.views.views] == [0.0, 0.2, 0.0, 0.0]
