"""Has a clustering/distillation run collapsed? Head statistics of a SwAV or DINO checkpoint on CIFAR-10 images.

A run whose final loss sits at log K (K prototypes) may have fallen into the uniform solution: every image gets
the same head embedding, so the codes (SwAV) or the centred teacher (DINO) are uniform and the prediction
matches them by being uniform too. This prints, for the training checkpoint and for the same method at its
random initialisation (seed 0), on the first 256 training images in the method's views (seeded):

- the mean pairwise cosine of the backbone's pooled vectors and of the head's unit embeddings
  (SwAV: the projection; DINO: the bottleneck before the prototypes);
- the mean entropy of the prediction over the prototypes (SwAV: softmax(scores / T); DINO: the student's
  softmax at its temperature), against log K.

    python benchmarks/head_collapse.py --data-root DIR --checkpoint RUN/swav/last.ckpt
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from sslbench.data import load_dataset
from sslbench.engine import load_training_module
from sslbench.methods.parts import pooled_by_resolution


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    x = F.normalize(x.float(), dim=1)
    similarity = x @ x.t()
    return similarity[~torch.eye(len(x), dtype=torch.bool)].mean().item()


@torch.no_grad()
def head_statistics(module: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    module.train()  # BatchNorm on batch statistics, as in a training step
    views = module.views(images, torch.Generator().manual_seed(0))
    pooled = pooled_by_resolution(module.encoder, views[:1])[0]
    if module.name == "swav":
        embedding = F.normalize(module.projection(pooled), dim=1)
        logits = F.linear(embedding, F.normalize(module.prototypes.weight, dim=1)) / module.options.temperature
    elif module.name == "dino":
        embedding = F.normalize(module.head.mlp(pooled), dim=1)
        logits = module.head.last_layer(embedding) / module.options.student_temperature
    else:
        raise SystemExit(f"{module.name}: this check reads SwAV and DINO heads only")
    entropy = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1).mean().item()
    return {"pooled cosine": mean_pairwise_cosine(pooled), "head cosine": mean_pairwise_cosine(embedding),
            "prediction entropy": entropy, "log K": math.log(logits.shape[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--checkpoint", required=True, type=Path, help="A run's last.ckpt (SwAV or DINO).")
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = load_dataset("cifar10", args.data_root, "train", limit=args.images).images
    trained = load_training_module(args.checkpoint)
    torch.manual_seed(0)
    random_init = type(trained)(trained.backbone_spec, trained.options, trained.train_config, trained.image_size, trained.steps_per_epoch)
    hparams = trained.hparams
    print(f"{args.checkpoint} ({hparams['method']}, options {hparams['options']}, train {hparams['train']})")
    for label, module in (("random init", random_init), ("trained", trained)):
        stats = head_statistics(module, images)
        print(f"  {label:12s}" + ", ".join(f"{key} {value:.4f}" for key, value in stats.items()))


if __name__ == "__main__":
    main()
