"""Does ``torch.compile`` (the engine's ``--compile``) pay for DDAE's U-Net on the CPU? Times one DDPM training step.

sslbench's ``unet-small`` (1.1M parameters, the U-Net of ``ddae_vs_diffusers.py``; ``--unet`` another preset), batch
128 of random 32x32 images, bf16 autocast (``--precision fp32``: none), AdamW 2e-4, 2 threads: the first step (which
includes compilation), then the mean of 10 steps after 3 warm-up steps. Run once per mode, on an otherwise idle machine:

    python benchmarks/ddae_compile.py eager
    python benchmarks/ddae_compile.py compile
    python benchmarks/ddae_compile.py compile --unet small-fast --precision fp32
"""

from __future__ import annotations

import argparse
import time

import torch

from sslbench.backbones import backbone_spec, build_encoder
from sslbench.backbones.diffusion import DDPMSchedule
from sslbench.methods.ddae import ddpm_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("eager", "compile"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--unet", default="small", help="U-Net preset (unet-PRESET).")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = build_encoder(backbone_spec(f"unet-{args.unet}"), pretrained=False).unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-4)
    model = torch.compile(unet) if args.mode == "compile" else unet
    schedule, generator = DDPMSchedule(), torch.Generator().manual_seed(0)
    images = torch.rand(128, 3, 32, 32) * 2 - 1

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = ddpm_loss(model, schedule, images, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    print(f"{args.mode}: first step {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    print(f"{args.mode}, unet-{args.unet}, {args.precision}: {seconds * 1000:.0f} ms per step, {len(images) / seconds:.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
