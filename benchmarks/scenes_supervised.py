"""Supervised ceiling of the procedural scenes at demo scale: how learnable the class label is with labels.

Trains the demo's encoder (CIFAR ResNet-18, quarter width, random init) with a linear classifier on the
first N training scenes (32 px, horizontal flips only), AdamW 2e-3, batch 128, and prints test top-1 on the
first 1000 test scenes after every epoch. The scenes docstring and the README quote this ceiling.

    python benchmarks/scenes_supervised.py [--train 4000] [--epochs 12]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sslbench.backbones import backbone_spec, build_encoder
from sslbench.data.scenes import load_scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    train, test = load_scenes(split="train", limit=args.train), load_scenes(split="test", limit=1000)
    encoder = build_encoder(backbone_spec("resnet18", 0.25, 32))
    head = torch.nn.Linear(encoder.pooled_dim, len(train.class_names))
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], 2e-3)
    images, labels = train.images.float() / 255, train.targets["class"]
    for epoch in range(args.epochs):
        encoder.train()
        for rows in torch.randperm(len(images)).split(128):
            batch = images[rows]
            flip = torch.rand(len(rows)) < 0.5
            batch[flip] = batch[flip].flip(-1)
            loss = F.cross_entropy(head(encoder(batch).pooled), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        encoder.eval()
        with torch.no_grad():
            predicted = head(encoder(test.images.float() / 255).pooled).argmax(1)
        print(f"epoch {epoch + 1}: train loss {loss.item():.3f}, test top-1 {(predicted == test.targets['class']).float().mean():.3f}", flush=True)


if __name__ == "__main__":
    main()
