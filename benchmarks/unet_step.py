"""One DDPM training step of a 32x32 U-Net, timed and taken apart: what bounds DDAE's speed on the CPU.

``speed.md`` (section 6) quotes these. Three measurements, each standalone (no Lightning, no data: random images,
timesteps and noise, batch 128, forward + MSE to the noise + backward + AdamW step):

- ``step``: ms per training step of sslbench's ``unet-small`` / ``-small-lean`` / ``-small-p2`` (PyTorch's layer init) or
  diffusers' ``UNet2DModel`` in the layout of ``unet-small`` (``ddae_vs_diffusers.diffusers_unet``), in fp32 or
  under bf16 autocast, NCHW or channels-last; ``--profile`` prints the top operators by input shape instead.
- ``groupnorm``: ms for one forward and backward of ``GroupNorm(32, 64)`` on a 128 x 64 x 32 x 32 map by input
  dtype and layout, under bf16 autocast.
- ``upsample``: ms for 2x nearest upsampling of a 128 x 64 x 16 x 16 map, PyTorch's kernel against sslbench's.
- ``pointwise``: ms for the 96 -> 32 1x1 convolution of a 128 x 96 x 32 x 32 map, oneDNN's against sslbench's.
- ``macs``: multiply-adds per image of every top-level block of a U-Net preset (convolutions and linear layers).

    python benchmarks/unet_step.py step --model small --precision bf16 [--channels-last] [--threads 2] [--profile | --op-times] [--reuse-freed-memory] [--to-mid]
    python benchmarks/unet_step.py groupnorm --threads 1
    python benchmarks/unet_step.py macs --model small
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddae_vs_diffusers import UNETS, diffusers_unet, recipe  # noqa: E402  (benchmarks/ is a folder of scripts)

from sslbench.backbones import build_encoder  # noqa: E402
from sslbench.backbones.unet import PointwiseConv, upsample_nearest2x  # noqa: E402
from sslbench.engine import reuse_freed_cpu_memory  # noqa: E402

BATCH = 128


def diffusers_to_mid(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The middle block's output of diffusers' ``UNet2DModel``: its ``forward`` up to ``mid_block``, decoder left out."""
    emb = net.time_embedding(net.time_proj(t).to(x.dtype))
    h = net.conv_in(x)
    for block in net.down_blocks:
        h, _ = block(hidden_states=h, temb=emb)
    return net.mid_block(h, emb)


def build(model: str, to_mid: bool = False) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The network (seed 0) and its noise prediction ``(x, t) -> eps``, or with ``to_mid`` its middle block's output
    (the encoder and middle block alone: the blocks DDAE reads)."""
    torch.manual_seed(0)
    if model == "diffusers":
        net = diffusers_unet()
        return net, (lambda x, t: diffusers_to_mid(net, x, t)) if to_mid else (lambda x, t: net(x, t).sample)
    net = build_encoder(recipe(model)["backbone"]).unet
    return net, (lambda x, t: net.forward_features(x, t, ["mid"])["mid"]) if to_mid else net


def time_steps(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Mean ms per call of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def make_step(model: str, precision: str, channels_last: bool, to_mid: bool = False) -> tuple[nn.Module, Callable[[], None]]:
    """The network and one training step of it on fixed random inputs. With ``to_mid`` the step trains the encoder
    and middle block alone, on the mean square of the middle block's output: the floor of any decoder's step."""
    net, predict = build(model, to_mid)
    optimizer = torch.optim.AdamW(net.parameters(), 2e-4)
    x, t, eps = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 1000, (BATCH,)), torch.randn(BATCH, 3, 32, 32)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            out = predict(x, t)
        loss = (out.float() - (0.0 if to_mid else eps)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return net, step


class OperatorTimes(TorchDispatchMode):
    """Wall time of every ATen call (forward and backward), by operator and the shape of its first tensor argument."""

    def __init__(self):
        super().__init__()
        self.seconds: collections.Counter[tuple[str, tuple[int, ...]]] = collections.Counter()
        self.calls: collections.Counter[tuple[str, tuple[int, ...]]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        key = (func.overloadpacket.__name__, tuple(first.shape) if first is not None else ())
        self.seconds[key] += time.perf_counter() - start
        self.calls[key] += 1
        return out


def operator_times(step: Callable[[], None], args: argparse.Namespace) -> None:
    """Print the operators of ``args.steps`` steps (after the warm-up), timed one call at a time, and their sum
    against the steps' wall time."""
    for _ in range(args.warmup):
        step()
    times = OperatorTimes()
    start = time.perf_counter()
    with times:
        for _ in range(args.steps):
            step()
    wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    print(f"{wall_ms:.0f} ms per step (wall), {sum(times.seconds.values()) * 1000 / args.steps:.0f} ms in operators")
    print("ms/step  calls/step  operator  first input")
    for (name, shape), seconds in times.seconds.most_common(25):
        print(f"{seconds * 1000 / args.steps:7.1f}  {times.calls[name, shape] / args.steps:10g}  {name}  {list(shape)}")


def training_step(args: argparse.Namespace) -> None:
    net, step = make_step(args.model, args.precision, args.channels_last, args.to_mid)
    layout = "channels-last" if args.channels_last else "NCHW"
    if args.profile:
        for _ in range(args.warmup):
            step()
        with torch.profiler.profile(record_shapes=True) as profiler:
            for _ in range(args.steps):
                step()
        # By input shape: the same operator costs very differently at 32x32 and at 8x8.
        print(profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20,
                                                                     max_name_column_width=32, max_shapes_column_width=80))
        return
    if args.op_times:
        operator_times(step, args)
        return
    ms = time_steps(step, args.warmup, args.steps)
    parameters = sum(p.numel() for p in net.parameters() if p.grad is not None)  # with --to-mid, the decoder's get none
    part = " encoder and middle block" if args.to_mid else ""
    print(f"{args.model}{part} ({parameters:,} parameters), {args.precision}, {layout}, {args.threads} threads: "
          f"{ms:.0f} ms per step of {BATCH}, {BATCH / ms * 1000:.0f} images/s")


def time_ops(args: argparse.Namespace, ops: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
             grad: torch.Tensor) -> None:
    """Print ms for the forward of each op on ``x``, and for forward + backward of the dense gradient ``grad`` (as in
    a network)."""
    shape = " x ".join(str(n) for n in x.shape)
    for name, op in ops.items():
        forward = time_steps(lambda: op(x.detach()), args.warmup, args.steps)
        both = time_steps(lambda: op(x).backward(grad), args.warmup, args.steps)
        print(f"{name}, {shape} fp32, {args.threads} threads: {forward:.1f} ms forward, {both:.1f} ms forward + backward")


def upsample(args: argparse.Namespace) -> None:
    """2x nearest upsampling of the lean U-Net's 16x16 decoder map: PyTorch's kernel against sslbench's copy."""
    x, grad = torch.randn(BATCH, 64, 16, 16, requires_grad=True), torch.randn(BATCH, 64, 32, 32)

    def autograd_copy(v: torch.Tensor) -> torch.Tensor:  # the same copy, with autograd's backward (a 6-d sum)
        return v[:, :, :, None, :, None].expand(*v.shape[:3], 2, v.shape[3], 2).reshape(*v.shape[:2], 2 * v.shape[2], 2 * v.shape[3])

    time_ops(args, {"F.interpolate": lambda v: F.interpolate(v, scale_factor=2.0, mode="nearest"),
                    "broadcast copy, autograd's backward": autograd_copy, "upsample_nearest2x": upsample_nearest2x}, x, grad)


def pointwise(args: argparse.Namespace) -> None:
    """The 1x1 convolution of unet-small-fast's 32x32 decoder block (96 -> 32 channels): oneDNN's against
    sslbench's batched matrix product (``PointwiseConv``), the same weights, on their own."""
    torch.manual_seed(0)
    ours = PointwiseConv(96, 32)
    theirs = nn.Conv2d(96, 32, 1)
    theirs.load_state_dict(ours.state_dict())
    x, grad = torch.randn(BATCH, 96, 32, 32, requires_grad=True), torch.randn(BATCH, 32, 32, 32)
    time_ops(args, {"nn.Conv2d(96, 32, 1)": theirs, "PointwiseConv(96, 32)": ours}, x, grad)


def groupnorm(args: argparse.Namespace) -> None:
    norm = nn.GroupNorm(32, 64)
    nchw = torch.randn(BATCH, 64, 32, 32)
    cases = {"NCHW bf16": nchw.bfloat16(), "channels-last bf16": nchw.contiguous(memory_format=torch.channels_last).bfloat16(),
             "NCHW fp32": nchw, "channels-last fp32": nchw.contiguous(memory_format=torch.channels_last)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, x in cases.items():
            x = x.detach().requires_grad_()
            ms = time_steps(lambda: norm(x).float().sum().backward(), args.warmup, args.steps)
            print(f"GroupNorm(32, 64), {BATCH} x 64 x 32 x 32, {name} input, {args.threads} threads: {ms:.1f} ms forward + backward")


def block_macs(net: nn.Module) -> collections.Counter[str]:
    """Multiply-adds per 32x32 image of each top-level block (``encoder.L.NAME``, ``decoder.L.NAME``, ``mid``, ...),
    counted from the output shapes of its convolutions and linear layers in one forward pass."""
    counts: collections.Counter[str] = collections.Counter()

    def count(block: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            per_position = output.numel() // output.shape[0]
            if isinstance(module, nn.Conv2d):
                counts[block] += per_position * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            else:
                counts[block] += per_position * module.in_features
        return hook

    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            parts = name.split(".")
            module.register_forward_hook(count(".".join(parts[:3] if parts[0] in ("encoder", "decoder") else parts[:1])))
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32), torch.tensor([5]))
    return counts


def macs(args: argparse.Namespace) -> None:
    counts = block_macs(build(args.model)[0])
    total = sum(counts.values())
    decoder = sum(value for block, value in counts.items() if block.startswith("decoder"))
    for block, value in counts.most_common():
        print(f"{block:16s} {value / 1e6:7.1f}M {value / total:6.1%}")
    print(f"total {total / 1e6:.1f}M multiply-adds per image; decoder {decoder / total:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("step", "groupnorm", "upsample", "pointwise", "macs"))
    parser.add_argument("--model", default="small", choices=(*UNETS, "diffusers"))
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="step: print torch.profiler's top operators of --steps steps instead.")
    parser.add_argument("--op-times", action="store_true", help="step: print the top operators of --steps steps, each call timed alone.")
    parser.add_argument("--to-mid", action="store_true",
                        help="step: train the encoder and middle block alone (a loss on the middle block's output), the floor of any decoder")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="keep freed memory for reuse, as sslbench's engine does on the CPU (sslbench.engine.reuse_freed_cpu_memory)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.reuse_freed_memory and not reuse_freed_cpu_memory():
        parser.error("--reuse-freed-memory needs Linux with glibc")
    {"step": training_step, "groupnorm": groupnorm, "upsample": upsample, "pointwise": pointwise, "macs": macs}[args.what](args)


if __name__ == "__main__":
    main()
