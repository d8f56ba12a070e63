"""Profile sslbench's real pretraining step (the Lightning loop of ``sslbench.engine.pretrain``) with torch.profiler.

A callback starts the profiler after ``--warmup`` steps and stops it ``--steps`` later, so the profile holds
only steady-state training steps of the path users run (uint8 batch gather, batched augmentation, forward,
loss, backward, optimiser, Lightning's hooks), on the C10-mini recipe of ``benchmarks/c10_mini.py``. It prints
the top operators by self time and the share of named phases (``record_function`` ranges: augmentation,
backbone forward and so on, where the method marks them), and writes the table to ``--table``.

    python benchmarks/profile_pretrain.py --data-root DIR --method simclr [--steps 10] [--table FILE]
    python benchmarks/profile_pretrain.py --data-root DIR --method ddae --backbone unet-small-fast   # another backbone
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from c10_mini import RECIPES  # noqa: E402  (benchmarks/ is a folder of scripts)

from sslbench.data import load_dataset  # noqa: E402
from sslbench.augment import VIEWS_RANGE  # noqa: E402
from sslbench.backbones import backbone_spec  # noqa: E402
from sslbench.engine import RunConfig, pretrain  # noqa: E402


class ProfileSteps(Callback):
    """Profile training steps ``warmup`` .. ``warmup + steps - 1``, then stop the run."""

    def __init__(self, warmup: int, steps: int, cuda: bool):
        self.warmup, self.steps = warmup, steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.profiler = profile(activities=activities, record_shapes=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self.profiler.__enter__()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup + self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.wall_ms_per_step = (time.perf_counter() - self.start) * 1000 / self.steps
            self.profiler.__exit__(None, None, None)
            trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--method", default="simclr", choices=sorted(RECIPES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--backbone", default=None, help="A backbone name (e.g. unet-small-fast) instead of the recipe's.")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--table", type=Path, default=None, help="Also write the table to this file.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = RECIPES[args.method]
    if args.backbone is not None:
        recipe = {**recipe, "backbone": backbone_spec(args.backbone)}
    batch = recipe["train"]["batch_size"]
    images = load_dataset("cifar10", args.data_root, "train", limit=batch * (args.warmup + args.steps + 1)).images
    callback = ProfileSteps(args.warmup, args.steps, cuda=args.accelerator == "gpu")
    with tempfile.TemporaryDirectory() as out:
        run = RunConfig(out=Path(out) / args.method, accelerator=args.accelerator, precision=args.precision)
        pretrain(args.method, images, run, backbone=recipe["backbone"], options=recipe["options"],
                 train={**recipe["train"], "epochs": 1}, callbacks=[callback])
    events = callback.profiler.key_averages()
    sort = "self_cuda_time_total" if args.accelerator == "gpu" else "self_cpu_time_total"
    views_ms = sum(event.cpu_time_total for event in events if event.key == VIEWS_RANGE) / 1000 / args.steps
    table = events.table(sort_by=sort, row_limit=args.rows)
    step_ms = callback.wall_ms_per_step
    header = (f"{args.method}: {args.steps} steps of batch {batch} on {args.accelerator} ({args.threads} threads, "
              f"{args.precision}): {step_ms:.0f} ms per step (wall, profiler on), of which augmentation "
              f"({VIEWS_RANGE}) {views_ms:.0f} ms ({views_ms / step_ms:.0%})\n")
    print(header + table)
    if args.table is not None:
        args.table.write_text(header + table)


if __name__ == "__main__":
    main()
