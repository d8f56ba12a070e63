"""CIFAR-10 and CIFAR-100 from the official "python version" pickles.

Layout (https://www.cs.toronto.edu/~kriz/cifar.html): ``cifar-10-batches-py/`` with ``data_batch_1``
to ``data_batch_5``, ``test_batch`` and ``batches.meta``; ``cifar-100-python/`` with ``train``,
``test`` and ``meta``. Each batch is a pickled dict whose ``data`` is a (N, 3072) uint8 array, one
row per image holding the red, green and blue 32x32 planes in row-major order. The files are pickles,
so only load copies from the dataset's page (unpickling runs code from the file).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslbench.data.base import ImageSet
from sslbench.data.folder import find_dataset_dir, one_line, resize_images
from sslbench.errors import ConfigError, DataError

CIFAR_SPLITS = ("train", "test")


def _read_pickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise DataError(f"{path} not found; the CIFAR folder is incomplete, download and extract it again")
    try:
        with open(path, "rb") as file:
            content = pickle.load(file, encoding="bytes")
    except Exception as error:  # truncated or non-pickle files raise EOFError, UnpicklingError, ValueError...
        raise DataError(f"cannot read CIFAR file {path}: {one_line(error)}; download and extract it again") from None
    if not isinstance(content, dict):
        raise DataError(f"cannot read CIFAR file {path}: expected a pickled dict, got {type(content).__name__}")
    return content


def _field(content: dict[bytes, Any], key: str, path: Path) -> Any:
    if key.encode() not in content:
        raise DataError(f"CIFAR file {path} has no {key!r} entry; is it from the other CIFAR version?")
    return content[key.encode()]


def _load_cifar(
    name: str,
    root: Path,
    split: str,
    folder_name: str,
    batch_files: dict[str, list[str]],
    meta_file: str,
    label_key: str,
    names_key: str,
    image_size: int | None,
    limit: int | None,
) -> ImageSet:
    if split not in CIFAR_SPLITS:
        raise ConfigError(f"unknown {name} split {split!r}; choose one of: {', '.join(CIFAR_SPLITS)}")
    folder = find_dataset_dir(root, folder_name, meta_file)
    images, labels, remaining = [], [], limit
    for file_name in batch_files[split]:
        if images and remaining is not None and remaining <= 0:
            break
        path = folder / file_name
        batch = _read_pickle(path)
        data = np.asarray(_field(batch, "data", path), dtype=np.uint8)
        batch_labels = np.asarray(_field(batch, label_key, path), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise DataError(
                f"CIFAR file {path} holds data of shape {data.shape} and {len(batch_labels)} labels; "
                "expected (N, 3072) and N labels"
            )
        if remaining is not None:
            data, batch_labels = data[:remaining], batch_labels[:remaining]
            remaining -= len(data)
        images.append(data)
        labels.append(batch_labels)
    meta_path = folder / meta_file
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(_read_pickle(meta_path), names_key, meta_path)]
    targets = torch.from_numpy(np.concatenate(labels))
    if len(targets) and (targets.min() < 0 or targets.max() >= len(class_names)):
        raise DataError(f"{name} labels in {folder} lie outside 0..{len(class_names) - 1} (the classes of {meta_path})")
    pixels = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)
    if image_size is not None:
        pixels = resize_images(pixels, image_size)
    return ImageSet(
        name=name,
        images=pixels,
        targets={"class": targets},
        num_classes={"class": len(class_names)},
        class_names=class_names,
    )


def load_cifar10(root: Path, split: str, image_size: int | None = None, limit: int | None = None) -> ImageSet:
    """CIFAR-10 ``train`` (50000) or ``test`` (10000) from ``cifar-10-batches-py/`` (``root`` or inside it)."""
    return _load_cifar(
        "cifar10", root, split, "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "batches.meta", "labels", "label_names", image_size, limit,
    )


def load_cifar100(
    root: Path, split: str, image_size: int | None = None, limit: int | None = None, labels: str = "fine"
) -> ImageSet:
    """CIFAR-100 ``train`` or ``test`` from ``cifar-100-python/``; ``labels`` is "fine" (100) or "coarse" (20)."""
    if labels not in ("fine", "coarse"):
        raise ConfigError(f"unknown CIFAR-100 label set {labels!r}; choose one of: fine, coarse")
    return _load_cifar(
        "cifar100", root, split, "cifar-100-python", {"train": ["train"], "test": ["test"]},
        "meta", f"{labels}_labels", f"{labels}_label_names", image_size, limit,
    )
