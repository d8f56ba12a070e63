"""kNN top-1 of every encoder in a training checkpoint: the online network and its EMA copy (BYOL's target, DINO's
teacher, MoCo's key encoder), on the C10-mini kNN protocol.

A method exports one of them (DINO its teacher, as the paper evaluates; BYOL and MoCo the online network). Whether
the other reads out better after a short schedule is a question of the recipe, which this answers for a finished
run without retraining:

    python benchmarks/ema_knn.py --data-root DIR --checkpoint RUN/METHOD/last.ckpt [--threads 1] [--limit N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sslbench.backbones import Encoder
from sslbench.data import load_dataset
from sslbench.engine import load_training_module
from sslbench.tasks import ClassificationTask, ProbeConfig


def encoders(module: torch.nn.Module) -> dict[str, Encoder]:
    """The module's top-level Encoder children by attribute name (``encoder``, ``teacher_encoder``, ...)."""
    return {name: child for name, child in module.named_children() if isinstance(child, Encoder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--checkpoint", required=True, type=Path, help="A run's last.ckpt.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="Smoke test, not the protocol: first N training and test images.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = load_training_module(args.checkpoint)
    train = load_dataset("cifar10", args.data_root, "train", limit=min(10_000, args.limit or 10_000))
    test = load_dataset("cifar10", args.data_root, "test", limit=args.limit)
    probe = ProbeConfig(seed=0, device="cpu", knn_k=200, knn_temperature=0.1)
    exported = module.export_encoder()
    print(f"{args.checkpoint} ({module.hparams['method']})")
    for name, encoder in encoders(module).items():
        top1 = ClassificationTask().evaluate(encoder, train, test, "knn", probe)["top1"]
        print(f"  {name:16s} kNN top-1 {top1:.4f}{'  (exported)' if encoder is exported else ''}", flush=True)


if __name__ == "__main__":
    main()
