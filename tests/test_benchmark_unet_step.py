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


@pytest.mark.parametrize("model", ["small-lean", "diffusers"])
def test_a_step_is_timed(unet_step, monkeypatch, capsys, model):
    monkeypatch.setattr(sys, "argv", ["unet_step.py", "step", "--model", model, "--threads", "1", "--warmup", "0", "--steps", "1"])
    unet_step.main()
    assert "ms per step of 128" in capsys.readouterr().out
