"""kNN top-1 of every layer of an exported ViT, against the same ViT at random init (C10-mini data).

Masked image models train their last layers for the pretext (BEiT's own linear evaluation, ``run_linear_eval.py``,
probes every layer and reports the best; iGPT reads the middle layer), so a readout of the final layer alone can hide
what the network learned. For each block l this reads two vectors: the CLS token of block l, and the mean over the
patches of block l's tokens after a LayerNorm without parameters (iGPT's readout), and scores each with the C10-mini
kNN (k = 200, T = 0.1; bank: training images 0..9999, queries: the 10,000 test images). The last row is the
encoder's own ``pooled`` vector (what ``c10_mini.py`` scores). The floor is the checkpoint's spec at random init
(seed 0).

    python benchmarks/vit_layers.py --data-root DIR --checkpoint RUN/METHOD [--threads 1] [--json FILE]

DIR holds ``cifar-10-batches-py/`` (``python ../shared/data/materialize.py DIR cifar10``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from sslbench.backbones import build_encoder
from sslbench.backbones.vit import VisionTransformer
from sslbench.data import load_dataset
from sslbench.engine import load_encoder
from sslbench.tasks.metrics import knn_predict

TRAIN_IMAGES = 10_000


@torch.no_grad()
def layer_features(encoder: VisionTransformer, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """``{"cls L": (N, dim), "patches L": (N, dim), ..., "pooled": (N, dim)}`` for uint8 images (N, 3, H, W)."""
    out: dict[str, list[torch.Tensor]] = {}
    block_outputs: list[torch.Tensor] = []
    # The blocks' outputs are caught on the encoder's own forward pass, which also gives ``pooled``.
    hooks = [block.register_forward_hook(lambda module, inputs, output: block_outputs.append(output))
             for block in encoder.blocks]
    try:
        for start in range(0, len(images), batch_size):
            block_outputs.clear()
            out.setdefault("pooled", []).append(encoder(images[start:start + batch_size].float() / 255).pooled)
            for index, hidden in enumerate(block_outputs, 1):
                out.setdefault(f"cls {index}", []).append(hidden[:, 0])
                out.setdefault(f"patches {index}", []).append(F.layer_norm(hidden[:, 1:], hidden.shape[-1:]).mean(1))
    finally:
        for hook in hooks:
            hook.remove()
    return {key: torch.cat(chunks) for key, chunks in out.items()}


def layer_knn(encoder: VisionTransformer, train, test) -> dict[str, float]:
    encoder.eval()
    bank, queries = layer_features(encoder, train.images), layer_features(encoder, test.images)
    scores = {}
    for key in bank:
        predicted = knn_predict(bank[key], train.targets["class"], queries[key], 10, 200, 0.1)
        scores[key] = (predicted == test.targets["class"]).float().mean().item()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained, meta = load_encoder(args.checkpoint)
    if not isinstance(trained, VisionTransformer):
        raise SystemExit(f"{args.checkpoint} holds a {meta['spec'].get('backbone')} encoder; this benchmark reads ViTs")
    train = load_dataset("cifar10", root=args.data_root, split="train", limit=TRAIN_IMAGES)
    test = load_dataset("cifar10", root=args.data_root, split="test")
    torch.manual_seed(0)
    random = build_encoder(trained.spec, pretrained=False)
    report = {"checkpoint": str(args.checkpoint), "method": meta.get("method"), "epochs": meta.get("epochs"),
              "trained": layer_knn(trained, train, test), "random init (seed 0)": layer_knn(random, train, test)}
    print("| readout | trained | random init | difference |\n|---|---|---|---|")
    for key, value in report["trained"].items():
        floor = report["random init (seed 0)"][key]
        print(f"| {key} | {100 * value:.2f}% | {100 * floor:.2f}% | {100 * (value - floor):+.2f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
