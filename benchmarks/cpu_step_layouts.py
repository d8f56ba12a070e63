"""Time one SimCLR-sized training step of the C10-mini backbone (CIFAR ResNet-18/4, 512 images = 2 views x 256) in
each memory layout and precision, on the CPU: NCHW vs channels_last, fp32 vs bf16 autocast.

Why: the engine picks the layout and precision for users, and on CPUs the choice is worth more than any change to
the data path (``benchmarks/profile_pretrain.py``: convolutions, BatchNorm and ReLU are ~80% of a step). Forward, a
scalar loss on the pooled features, backward and an SGD step; the first two steps are warm-up.

    python benchmarks/cpu_step_layouts.py [--threads 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from c10_mini import RESNET  # noqa: E402  (benchmarks/ is a folder of scripts)

from sslbench.backbones import build_encoder  # noqa: E402


def step_ms(images: torch.Tensor, channels_last: bool, bf16: bool, steps: int) -> float:
    torch.manual_seed(0)
    encoder = build_encoder(RESNET)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.01, momentum=0.9)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = encoder(images).pooled.float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1000 * sum(times[2:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="fp32 only on a CPU without native bf16 kernels, where a bf16 step takes minutes.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = torch.rand(512, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    print(f"| layout | precision | ms per 512-image step ({args.threads} threads) |\n|---|---|---|")
    for channels_last in (False, True):
        for bf16 in (precision == "bf16" for precision in args.precisions):
            ms = step_ms(images, channels_last, bf16, args.steps)
            print(f"| {'channels_last' if channels_last else 'NCHW'} | {'bf16 autocast' if bf16 else 'fp32'} | {ms:.0f} |", flush=True)


if __name__ == "__main__":
    main()
