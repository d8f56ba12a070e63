"""sslbench's batched augmentation against its version at another commit: ms per 256-image SimCLR view, alternating
rounds so that machine drift hits both, and the largest difference between the two versions' views (same seed).

``speed.md`` section 13 quotes it.

    python benchmarks/augment_ab.py --old-commit REV [--rounds 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from sslbench import augment


def module_at(commit: str) -> ModuleType:
    """``sslbench/augment.py`` as it was at ``commit``, imported under another name."""
    source = subprocess.run(["git", "show", f"{commit}:sslbench/augment.py"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent).stdout
    path = Path(tempfile.mkdtemp()) / "augment_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("augment_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def ms_per_view(module: ModuleType, images: torch.Tensor, views: int = 5) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(views):
        module.augment(images, module.ViewConfig(), generator)
    return (time.perf_counter() - start) / views * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-commit", required=True)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = module_at(args.old_commit)
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for module in (old, augment):  # warm-up
        ms_per_view(module, images)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        times["old"].append(ms_per_view(old, images))
        times["new"].append(ms_per_view(augment, images))
    for name, values in times.items():
        print(f"{name}: ms per view, sorted: {', '.join(f'{v:.1f}' for v in sorted(values))}")
    difference = (old.augment(images, old.ViewConfig(), torch.Generator().manual_seed(1))
                  - augment.augment(images, augment.ViewConfig(), torch.Generator().manual_seed(1))).abs().max()
    print(f"largest difference between the two versions' views: {difference.item():g}")


if __name__ == "__main__":
    main()
