"""The DDPM U-Net: size of the paper's CIFAR-10 model, named blocks, early-stopping feature readout."""

import json

import pytest
import torch
import torch.nn.functional as F

from sslbench.backbones.unet import (UNET_PRESETS, UNet, UNetConfig, attention, timestep_embedding, unet_config_dict,
                                     PointwiseConv, ResBlock, add_upsampled, upsample_nearest2x)
from sslbench.backbones import unet as unet_module
from sslbench.errors import ConfigError


TINY_BLOCKS = ["in", "down0.0", "down0.down", "down1.0", "down1.down", "down2.0", "mid",
               "up2.0", "up2.1", "up2.up", "up1.0", "up1.1", "up1.up", "up0.0", "up0.1", "out"]


def random_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """A U-Net whose every weight is non-zero (the DDPM init zeroes residual branches and the output)."""
    torch.manual_seed(seed)
    unet = UNet(config).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.2)
    return unet


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_ddpm_cifar10_is_the_papers_35_7m_parameter_model():
    with torch.device("meta"):
        unet = UNet(UNET_PRESETS["ddpm_cifar10"])
    assert round(count(unet) / 1e6, 1) == 35.7
    assert count(unet) == 35_746_307  # what the official DDAE code prints for its DDPM CIFAR-10 U-Net
    assert unet.block_stride("down1.1") == 2 and unet.block_channels("mid") == 256


def test_preset_sizes():
    with torch.device("meta"):
        assert count(UNet(UNET_PRESETS["tiny"])) < 300_000
        assert round(count(UNet(UNET_PRESETS["small"])) / 1e6, 1) == 1.1
        assert count(UNet(UNET_PRESETS["small-lean"])) == 754_531
        assert count(UNet(UNET_PRESETS["small-fast"])) == 598_883


def test_forward_predicts_noise_of_the_input_shape():
    unet = random_unet(UNET_PRESETS["tiny"])
    x = torch.randn(2, 3, 16, 24)
    assert unet(x, torch.tensor([0, 999])).shape == x.shape
    assert unet(x, torch.tensor(5)).shape == x.shape  # one timestep for the whole batch


def test_untrained_unet_predicts_zero_noise():
    unet = UNet(UNET_PRESETS["tiny"])
    assert torch.count_nonzero(unet(torch.randn(2, 3, 16, 16), torch.tensor([3, 7]))) == 0


def test_pytorch_init_is_each_layers_default_and_predicts_non_zero_noise():
    config = UNetConfig(**{**unet_config_dict(UNET_PRESETS["tiny"]), "init": "pytorch"})
    torch.manual_seed(0)
    unet = UNet(config)
    assert torch.count_nonzero(unet(torch.randn(2, 3, 16, 16), torch.tensor([3, 7]))) > 0
    conv = unet.out.conv
    # nn.Conv2d's default: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias alike.
    bound = 1 / (conv.in_channels * 9) ** 0.5
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert conv.bias.abs().max() <= bound and torch.count_nonzero(conv.bias) == 3
    torch.manual_seed(0)
    again = UNet(config)
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), again.parameters()))
    with pytest.raises(ConfigError, match="init='xavier' is not known; use ddpm or pytorch"):
        UNetConfig(init="xavier")


def test_block_names_strides_and_channels_match_the_features():
    unet = random_unet(UNET_PRESETS["tiny"])
    assert unet.block_names() == TINY_BLOCKS
    with torch.no_grad():
        features = unet.forward_features(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), unet.block_names())
    assert list(features) == TINY_BLOCKS
    for name, feature in features.items():
        stride = unet.block_stride(name)
        assert feature.shape == (2, unet.block_channels(name), 32 // stride, 32 // stride), name


def test_ddpm_cifar10_block_names():
    with torch.device("meta"):
        names = UNet(UNET_PRESETS["ddpm_cifar10"]).block_names()
    assert names[:4] == ["in", "down0.0", "down0.1", "down0.down"]
    assert names[names.index("mid") - 2:names.index("mid") + 4] == ["down3.0", "down3.1", "mid", "up3.0", "up3.1", "up3.2"]
    assert names[-5:] == ["up1.up", "up0.0", "up0.1", "up0.2", "out"]
    # DDAE's readout "out_6" (sixth decoder ResBlock) is up2.2.
    assert [n for n in names if n.startswith("up") and not n.endswith(".up")][5] == "up2.2"


def test_last_block_equals_forward():
    unet = random_unet(UNET_PRESETS["tiny"])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.allclose(unet.forward_features(x, t, ["out"])["out"], unet(x, t))


def test_forward_features_runs_only_as_far_as_needed():
    unet = random_unet(UNET_PRESETS["tiny"])
    calls = []
    unet.mid.register_forward_hook(lambda *_: calls.append("mid"))
    for level in unet.decoder:
        for block in level.values():
            block.register_forward_hook(lambda *_: calls.append("decoder"))
    unet.out.register_forward_hook(lambda *_: calls.append("out"))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([3])
    unet.forward_features(x, t, ["down1.0"])
    assert calls == []
    unet.forward_features(x, t, ["mid", "in"])
    assert calls == ["mid"]
    calls.clear()
    unet.forward_features(x, t, ["up2.0"])
    assert calls == ["mid", "decoder"]


def test_unknown_block_is_a_config_error():
    unet = UNet(UNET_PRESETS["tiny"])
    with pytest.raises(ConfigError, match="unknown U-Net block 'down9.0'"):
        unet.forward_features(torch.zeros(1, 3, 16, 16), torch.tensor([0]), ["down9.0"])
    with pytest.raises(ConfigError, match="unknown U-Net block"):
        unet.block_stride("middle")


def test_channels_last_gives_the_same_output():
    unet = random_unet(UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(2,), dropout=0.0, groups=8))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 900])
    with torch.no_grad():
        expected = unet(x, t)
        unet = unet.to(memory_format=torch.channels_last)
        got = unet(x.contiguous(memory_format=torch.channels_last), t)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_gradients_through_in_place_ops_are_exact():
    # The U-Net writes SiLU, time embedding and residual sums in place; gradcheck proves backward is exact.
    config = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(1,), dropout=0.0, groups=4)
    unet = random_unet(config).double()
    x = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: unet(inp, torch.tensor([7])), (x,), eps=1e-6, atol=1e-5)


def test_attention_on_a_hand_computed_case_and_bf16_cpu_path_matches_the_fused_kernel():
    # Two tokens, d = 4: q . k / 2 gives scores [[1, 0], [0, 0]], so token 0 weights the values e/(e+1), 1/(e+1).
    q = torch.tensor([[[2.0, 0, 0, 0], [0, 0, 0, 0]]])
    k = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0]]])
    v = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0]]])
    e = torch.e
    expected = torch.tensor([[[e / (e + 1), 1 / (e + 1), 0, 0], [0.5, 0.5, 0, 0]]])
    assert torch.allclose(attention(q, k, v), expected, atol=1e-6)
    assert torch.allclose(attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float(), expected, atol=1e-2)
    # The plain bf16 path (CPU) and the fused kernel on the same bf16 inputs agree to bf16 precision, with gradients.
    q, k, v = (torch.randn(3, 64, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    plain = attention(q, k, v)
    fused = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
    assert plain.dtype == torch.bfloat16 and torch.allclose(plain.float(), fused.float(), atol=2e-2)
    grads = torch.autograd.grad(plain.float().square().sum(), (q, k, v))
    fused_grads = torch.autograd.grad(fused.float().square().sum(), (q, k, v))
    for got, want in zip(grads, fused_grads):
        assert torch.allclose(got.float(), want.float(), atol=5e-2, rtol=5e-2)


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 3]), 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert torch.isclose(emb[1, 0], torch.sin(torch.tensor(3.0)))  # the first frequency is 1


def decoder_inputs(unet: UNet, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each decoder ResBlock concatenates, caught at its input: block name -> (B, C, H, W)."""
    caught: dict[str, torch.Tensor] = {}
    handles = [unet.decoder[int(name[2])][name.split(".")[1]].register_forward_pre_hook(
        lambda module, inputs, name=name: caught.__setitem__(name, inputs[0]))
        for name in unet.block_names() if name.startswith("up") and not name.endswith(".up")]
    unet(x, t)
    for handle in handles:
        handle.remove()
    return caught


@torch.no_grad()
def test_each_decoder_resblock_concatenates_a_skip_of_its_level_deepest_first():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    # DDPM's decoder (num_res_blocks + 1 blocks per level) reads every skip: at level 0, down0.0, then the input conv.
    unet = random_unet(UNET_PRESETS["tiny"])
    inputs, outputs = decoder_inputs(unet, x, t), unet.forward_features(x, t, unet.block_names())
    for block, skip in [("up2.0", "down2.0"), ("up2.1", "down1.down"), ("up1.0", "down1.0"), ("up1.1", "down0.down"),
                        ("up0.0", "down0.0"), ("up0.1", "in")]:
        assert torch.equal(inputs[block][:, -unet.block_channels(skip):], outputs[skip]), block
    # A lean decoder: one ResBlock per level reads the deepest skip; upsampling is nearest-neighbour only.
    lean = random_unet(UNetConfig(**{**unet_config_dict(UNET_PRESETS["tiny"]), "decoder_res_blocks": 1, "upsample_conv": False}))
    assert lean.block_names() == ["in", "down0.0", "down0.down", "down1.0", "down1.down", "down2.0", "mid",
                                  "up2.0", "up2.up", "up1.0", "up1.up", "up0.0", "out"]
    inputs, outputs = decoder_inputs(lean, x, t), lean.forward_features(x, t, lean.block_names())
    for block, previous, skip in [("up2.0", "mid", "down2.0"), ("up1.0", "up2.up", "down1.0"), ("up0.0", "up1.up", "down0.0")]:
        assert torch.equal(inputs[block], torch.cat([outputs[previous], outputs[skip]], 1)), block
    assert torch.equal(outputs["up1.up"], torch.nn.functional.interpolate(outputs["up1.0"], scale_factor=2.0, mode="nearest"))
    assert count(lean.decoder[1]["up"]) == 0 and count(lean) < count(unet)
    assert lean(x, t).shape == x.shape


@torch.no_grad()
def test_a_decoder_with_1x1_skip_mixing_and_no_top_block():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    lean = {**unet_config_dict(UNET_PRESETS["tiny"]), "decoder_res_blocks": 1, "upsample_conv": False}
    reference = random_unet(UNetConfig(**lean))
    # decoder_kernel=1: each decoder ResBlock's first conv, which reads the concatenated skip, is 1x1; the rest
    # of the network is unchanged, so the encoder's features are the same for the same weights.
    mixing = UNet(UNetConfig(**{**lean, "decoder_kernel": 1})).eval()
    for level in mixing.decoder:
        for name, block in level.items():
            if name != "up":
                assert block.conv1.kernel_size == (1, 1) and block.conv1.padding == (0, 0) and block.conv2.kernel_size == (3, 3)
    shared = {k: v for k, v in reference.state_dict().items() if not k.startswith("decoder.") or ".conv1." not in k}
    mixing.load_state_dict(shared, strict=False)
    before = reference.forward_features(x, t, ["mid"])["mid"]
    assert torch.equal(mixing.forward_features(x, t, ["mid"])["mid"], before)
    assert mixing(x, t).shape == x.shape
    # top_decoder_block=False: no decoder ResBlock at the first level; the output head reads the upsampled map
    # concatenated with that level's deepest encoder skip (down0.0).
    top_less = random_unet(UNetConfig(**{**lean, "top_decoder_block": False}))
    assert top_less.block_names() == ["in", "down0.0", "down0.down", "down1.0", "down1.down", "down2.0", "mid",
                                      "up2.0", "up2.up", "up1.0", "up1.up", "out"]
    features = top_less.forward_features(x, t, top_less.block_names())
    head_input = torch.cat([features["up1.up"], features["down0.0"]], 1)
    assert top_less.out.conv.in_channels == head_input.shape[1] == 32 + 16
    assert torch.allclose(top_less(x, t), top_less.out(head_input), atol=1e-6)
    assert len(top_less.decoder[0]) == 0 and count(top_less) < count(reference)


def test_nearest_upsampling_copy_equals_pytorchs_kernel_in_both_layouts():
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = x.contiguous(memory_format=layout)
        ours, theirs = upsample_nearest2x(y), F.interpolate(y, scale_factor=2.0, mode="nearest")
        assert torch.equal(ours, theirs) and ours.is_contiguous(memory_format=layout)
        weights = torch.randn_like(theirs)
        ours_grad, = torch.autograd.grad((ours * weights).sum(), x)
        theirs_grad, = torch.autograd.grad((theirs * weights).sum(), x)
        assert torch.allclose(ours_grad, theirs_grad, atol=1e-6)
        # The gradient may arrive in the other layout or as a slice (the backward of a concatenation).
        for grad in (weights.contiguous(), weights.contiguous(memory_format=torch.channels_last),
                     torch.randn(2, 7, 6, 8).contiguous(memory_format=layout)[:, 1:6]):
            ours_grad, = torch.autograd.grad(ours, x, grad)
            theirs_grad, = torch.autograd.grad(theirs, x, grad)
            assert torch.allclose(ours_grad, theirs_grad, atol=1e-6)
    x64 = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(upsample_nearest2x, (x64,))
    assert torch.autograd.gradcheck(upsample_nearest2x, (x64.detach().contiguous(memory_format=torch.channels_last).requires_grad_(),))


def test_adding_an_upsampled_map_equals_adding_its_upsampling_in_both_layouts():
    fine, coarse = torch.randn(2, 3, 6, 8, requires_grad=True), torch.randn(2, 3, 3, 4, requires_grad=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        f, c = fine.contiguous(memory_format=layout), coarse.contiguous(memory_format=layout)
        ours, theirs = add_upsampled(f, c), f + F.interpolate(c, scale_factor=2.0, mode="nearest")
        assert torch.equal(ours, theirs) and ours.is_contiguous(memory_format=layout)
        grad = torch.randn_like(theirs)
        for a, b in zip(torch.autograd.grad(ours, (fine, coarse), grad), torch.autograd.grad(theirs, (fine, coarse), grad)):
            assert torch.allclose(a, b, atol=1e-6)
    # Mixed layouts, or a fine map that is a slice, take the plain path and give the same sum.
    assert torch.equal(add_upsampled(fine, coarse.contiguous(memory_format=torch.channels_last)), add_upsampled(fine, coarse))
    wide = torch.randn(2, 5, 6, 8)
    assert torch.equal(add_upsampled(wide[:, 1:4], coarse), wide[:, 1:4] + upsample_nearest2x(coarse))
    f64, c64 = (torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True), torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(add_upsampled, (f64, c64))


@pytest.mark.parametrize("coarse_channels, fine_channels, groups", [(6, 3, 3), (5, 4, 3), (4, 4, 8)])
def test_group_norm_of_a_concatenation_with_an_upsampled_part(coarse_channels, fine_channels, groups):
    """Groups within one part, a group straddling both parts (5 + 4 channels in groups of 3), one channel a group."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, coarse_channels + fine_channels)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    coarse, fine = torch.randn(2, coarse_channels, 3, 4) * 3 + 1, torch.randn(2, fine_channels, 6, 8)
    (scale_c, shift_c), (scale_f, shift_f) = unet_module._concat_group_norm_affine(norm, [coarse, fine])
    ours = torch.cat([upsample_nearest2x(coarse * scale_c + shift_c), fine * scale_f + shift_f], 1)
    theirs = norm(torch.cat([upsample_nearest2x(coarse), fine], 1))
    assert torch.allclose(ours, theirs, atol=1e-5)


def decoder_block(channels_last: bool) -> tuple[ResBlock, list[torch.Tensor]]:
    """A decoder ResBlock of unet-small-fast's kind (1x1 first conv, 3x3 second) with a coarse map, a skip and a
    time activation; the 48 input channels make GroupNorm's groups of 3 straddle the two maps."""
    torch.manual_seed(0)
    block = ResBlock(32 + 16, 16, 64, 0.0, 16, kernels=(1, 3)).double()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [torch.randn(2, 32, 4, 4, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(),
              torch.randn(2, 16, 8, 8, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(),
              torch.randn(2, 64, dtype=torch.float64, requires_grad=True)]
    return block, inputs


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_decoder_block_reads_the_upsampled_concatenation_without_making_it(channels_last):
    block, (coarse, skip, time_act) = decoder_block(channels_last)
    assert block.reads_upsampled_exactly()
    ours = block.forward_upsampled(coarse, skip, time_act)
    theirs = block(torch.cat([upsample_nearest2x(coarse), skip], 1), time_act)
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(theirs)
    wrt = [coarse, skip, time_act, *block.parameters()]
    for a, b in zip(torch.autograd.grad(ours, wrt, grad), torch.autograd.grad(theirs, wrt, grad)):
        torch.testing.assert_close(a, b)
    assert not ResBlock(48, 16, 64, 0.0, 16).reads_upsampled_exactly()  # a 3x3 first conv reads neighbours


def test_the_unet_upsamples_inside_the_next_decoder_block_unless_the_upsampling_is_read(monkeypatch):
    """unet-small-fast's layout: the same outputs whether the decoder makes the upsampled maps or not."""
    config = UNetConfig(**{**unet_config_dict(UNET_PRESETS["tiny"]), "decoder_res_blocks": 1, "upsample_conv": False,
                           "decoder_kernel": 1})
    unet = random_unet(config).double()
    x, t = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([3, 500])
    calls = []
    original = ResBlock.forward_upsampled
    monkeypatch.setattr(ResBlock, "forward_upsampled", lambda self, *args: calls.append(self) or original(self, *args))
    fused = unet.forward_features(x, t, ["up0.0", "out"])
    assert calls == [unet.decoder[1]["0"], unet.decoder[0]["0"]]
    made = unet.forward_features(x, t, ["up2.up", "up1.up", "up0.0", "out"])
    assert len(calls) == 2
    torch.testing.assert_close(fused["up0.0"], made["up0.0"])
    torch.testing.assert_close(fused["out"], made["out"])
    random_unet(UNET_PRESETS["tiny"])(x.float(), t)  # its decoder convolves its input 3x3: never the path
    assert len(calls) == 2


def test_pointwise_conv_is_a_1x1_convolution_in_both_layouts():
    torch.manual_seed(0)
    conv = PointwiseConv(6, 4)
    assert conv.weight.shape == (4, 6, 1, 1)  # checkpoints of nn.Conv2d(6, 4, 1) load into it
    x = torch.randn(3, 6, 5, 7, requires_grad=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = x.contiguous(memory_format=layout)
        ours, theirs = conv(y), F.conv2d(y, conv.weight, conv.bias)
        assert torch.allclose(ours, theirs, atol=1e-5) and ours.is_contiguous(memory_format=layout)
        grad = torch.randn_like(theirs)
        ours_grads = torch.autograd.grad(ours, (x, conv.weight, conv.bias), grad)
        theirs_grads = torch.autograd.grad(theirs, (x, conv.weight, conv.bias), grad)
        for a, b in zip(ours_grads, theirs_grads):
            assert torch.allclose(a, b, atol=1e-4)


def test_a_training_forward_copies_no_map_and_inference_normalises_in_place():
    """SiLU after GroupNorm: out of place under autograd (an in-place SiLU makes autograd copy its input first), in
    place when no graph is recorded; the same values either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            if self.names[-1] == "clone" and args[0].dim() == 4:  # (the upsampling's reshape clones a 6-d view)
                self.names[-1] = "clone of a map"
            return func(*args, **(kwargs or {}))

    unet = random_unet(UNET_PRESETS["tiny"])
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 500])
    with Ops() as training:
        out = unet(x, t)
    with torch.no_grad(), Ops() as inference:
        same = unet(x, t)
    assert "clone of a map" not in training.names and "silu_" not in training.names and "silu" in training.names
    assert "silu_" in inference.names
    torch.testing.assert_close(out, same)


def test_config_validation_and_json_round_trip():
    with pytest.raises(ConfigError, match="decoder_res_blocks=3 is out of range"):
        UNetConfig(num_res_blocks=1, decoder_res_blocks=3)
    with pytest.raises(ConfigError, match="attention_resolutions"):
        UNetConfig(channel_mults=(1, 2), attention_resolutions=(4,))
    with pytest.raises(ConfigError, match="groups"):
        UNetConfig(base_channels=24, groups=32)
    with pytest.raises(ConfigError, match="decoder_kernel=5 is not supported; use 3"):
        UNetConfig(decoder_kernel=5)
    with pytest.raises(ConfigError, match="decoder_kernel2=2 is not supported; use 3"):
        UNetConfig(decoder_kernel2=2)
    with pytest.raises(ConfigError, match="patch_size and every channel_mult must be >= 1"):
        UNetConfig(patch_size=0)
    # Attention strides count image pixels: on 2x2 patches the levels are at 2, 4, 8.
    with pytest.raises(ConfigError, match=r"attention_resolutions \[1\] are not level strides; use some of \[2, 4, 8\]"):
        UNetConfig(channel_mults=(1, 2, 2), patch_size=2, attention_resolutions=(1,))
    config = UNET_PRESETS["small"]
    assert UNetConfig(**json.loads(json.dumps(unet_config_dict(config)))) == config


def test_patches_fold_into_channels_before_the_first_conv_and_unfold_from_the_output():
    config = UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0,
                        groups=8, patch_size=2)
    unet = random_unet(config)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    names = unet.block_names()
    features = unet.forward_features(x, t, names)
    # The first conv reads 2x2 patches as 12 channels; every level runs at half the image's resolution.
    assert unet.conv_in.in_channels == 12
    assert torch.allclose(features["in"], unet.conv_in(F.pixel_unshuffle(x, 2)), atol=1e-6)
    for name in names[:-1]:
        assert unet.block_stride(name) in (2, 4)
        assert features[name].shape[-1] == 16 // unet.block_stride(name), name
    assert unet.block_stride("mid") == 4 and features["mid"].shape[-2:] == (4, 4)
    # The output head predicts 12 channels per patch, unfolded back to the image grid.
    expected = F.pixel_shuffle(unet.out(features[names[-2]]), 2)
    assert features["out"].shape == x.shape and torch.allclose(features["out"], expected, atol=1e-6)
    assert torch.allclose(unet(x, t), expected, atol=1e-6)


@torch.no_grad()
def test_a_position_wise_decoder_and_projection_before_upsampling():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    lean = {**unet_config_dict(UNET_PRESETS["tiny"]), "decoder_res_blocks": 1, "upsample_conv": False, "decoder_kernel": 1}
    reference = random_unet(UNetConfig(**lean))
    pointwise = random_unet(UNetConfig(**{**lean, "decoder_kernel2": 1, "upsample_project": True}))
    for level in pointwise.decoder:
        for name, block in level.items():
            if name != "up":
                assert block.conv1.kernel_size == block.conv2.kernel_size == (1, 1) and block.conv2.padding == (0, 0)
    # tiny is 16/32/32: only the upsampling into the 16-channel level projects (32 -> 16, at the coarser resolution).
    assert isinstance(pointwise.decoder[2]["up"].project, torch.nn.Identity)
    assert (pointwise.decoder[1]["up"].project.in_channels, pointwise.decoder[1]["up"].project.out_channels) == (32, 16)
    assert pointwise.block_channels("up1.up") == 16 and reference.block_channels("up1.up") == 32
    features = pointwise.forward_features(x, t, ["up1.0", "up1.up", "down0.0"])
    projected = pointwise.decoder[1]["up"].project(features["up1.0"])
    assert torch.equal(features["up1.up"], torch.nn.functional.interpolate(projected, scale_factor=2.0, mode="nearest"))
    assert pointwise.decoder[0]["0"].norm1.num_channels == 16 + 16  # was 32 + 16
    assert pointwise(x, t).shape == x.shape and count(pointwise) < count(reference)
    # The encoder and the middle block are built as before: the same weights give the same features.
    shared = {k: v for k, v in reference.state_dict().items() if not k.startswith("decoder.")}
    pointwise.load_state_dict(shared, strict=False)
    assert torch.equal(pointwise.forward_features(x, t, ["mid"])["mid"], reference.forward_features(x, t, ["mid"])["mid"])
