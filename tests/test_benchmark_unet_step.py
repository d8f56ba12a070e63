"""benchmarks/unet_step.py: the multiply-add count by hand, and a timed step of each model."""

import sys

import pytest


@pytest.fixture(scope="module")
def unet_step(load_benchmark):
    return load_benchmark("unet_step")


def test_multiply_adds_by_hand(unet_step):
    small = unet_step.block_macs(unet_step.build("small")[0])
    assert small["conv_in"] == 32 * 32 * 32 * 3 * 3 * 3  # 32x32 positions, 32 outputs, a 3x3 kernel over 3 channels
    assert small["decoder.1.up"] == 32 * 32 * 64 * 64 * 3 * 3  # the conv after upsampling to 32x32, 64 channels
    lean = unet_step.block_macs(unet_step.build("small-lean")[0])
    assert "decoder.1.up" not in lean and lean["conv_in"] == small["conv_in"]
    assert sum(lean.values()) < 0.6 * sum(small.values())
    # On 2x2 patches every conv but the first and last runs at a quarter of the positions; those two see 4x the
    # channels (input) or outputs (output) at a quarter of the positions: the same work.
    patched = unet_step.block_macs(unet_step.build("small-p2")[0])
    assert patched["conv_in"] == small["conv_in"] and patched["out"] == small["out"]
    time_projection = 128 * 32  # the ResBlock's time-embedding projection (128 -> 32) does not scale with positions
    assert (patched["encoder.0.0"] - time_projection) * 4 == small["encoder.0.0"] - time_projection
    assert sum(patched.values()) < 0.26 * sum(small.values())


@pytest.mark.parametrize("model", ["small-p2", "diffusers"])
def test_a_step_is_timed(unet_step, monkeypatch, capsys, model):
    # fp32: bf16 convolutions on a CPU without bf16 kernels take PyTorch's reference path (minutes a step).
    monkeypatch.setattr(sys, "argv", ["unet_step.py", "step", "--model", model, "--precision", "fp32", "--threads", "1",
                                      "--warmup", "0", "--steps", "1"])
    unet_step.main()
    assert "ms per step of 128" in capsys.readouterr().out


def test_the_upsampling_kernels_are_timed(unet_step, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["unet_step.py", "upsample", "--threads", "1", "--warmup", "0", "--steps", "1"])
    unet_step.main()
    out = capsys.readouterr().out
    assert "F.interpolate" in out and "autograd" in out and "upsample_nearest2x" in out and out.count("ms forward + backward") == 3


def test_the_pointwise_convolutions_are_timed(unet_step, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["unet_step.py", "pointwise", "--threads", "1", "--warmup", "0", "--steps", "1"])
    unet_step.main()
    out = capsys.readouterr().out
    assert "nn.Conv2d(96, 32, 1)" in out and "PointwiseConv(96, 32)" in out and out.count("ms forward + backward") == 2


def test_the_operators_of_a_step_are_timed_one_call_at_a_time(unet_step, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["unet_step.py", "step", "--model", "small-fast", "--precision", "fp32", "--threads", "1",
                                      "--warmup", "0", "--steps", "1", "--op-times"])
    unet_step.main()
    out = capsys.readouterr().out
    wall, inside = float(out.split(" ms per step")[0]), float(out.split("(wall), ")[1].split(" ms")[0])
    assert 0 < inside <= wall * 1.05  # the operators run inside the step
    assert "convolution_backward  [128, 32, 32, 32]" in out  # the 3x3 convolutions at 32x32, forward and backward


@pytest.mark.parametrize("model", ["small-fast", "diffusers"])
def test_the_encoder_alone_ends_at_the_middle_block(unet_step, model):
    import torch

    net, to_mid = unet_step.build(model, to_mid=True)
    mid = net.mid_block if model == "diffusers" else net.mid
    seen = []
    mid.register_forward_hook(lambda module, inputs, output: seen.append(output))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 700])
    with torch.no_grad():
        whole = net(x, t)
        alone = to_mid(x, t)
    assert (whole.sample if model == "diffusers" else whole).shape == (2, 3, 32, 32)
    assert alone.shape == (2, 64, 8, 8) and torch.equal(alone, seen[0]) and len(seen) == 2  # the full pass's middle block


def test_the_step_of_the_encoder_alone_is_timed(unet_step, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["unet_step.py", "step", "--model", "diffusers", "--precision", "fp32", "--threads", "1",
                                      "--warmup", "0", "--steps", "1", "--to-mid"])
    unet_step.main()
    assert "diffusers encoder and middle block (" in capsys.readouterr().out

