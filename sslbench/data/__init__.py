"""Datasets: one registry from a name to its loader and its train/test split names.

Every loader reads an official on-disk layout (or, for ``scenes``, generates the built-in procedural
data) and returns an in-memory ``ImageSet``. A plain ``folder`` can instead stream for pretraining
(``stream_dataset``), when it is too large to hold in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sslbench.data.base import IGNORE_INDEX, ImageSet
from sslbench.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sslbench.data.folder import ImageFiles


@dataclass(frozen=True)
class DatasetEntry:
    """How to load a dataset: its loader, split names, the tasks its labels support, and whether it needs a root."""

    loader: Callable[..., ImageSet]
    train_split: str
    test_split: str
    tasks: tuple[str, ...]
    needs_root: bool = True
    layout: str = ""


def _lazy(module: str, function: str) -> Callable[..., ImageSet]:
    def load(*args, **kwargs) -> ImageSet:
        import importlib

        return getattr(importlib.import_module(module), function)(*args, **kwargs)

    return load


DATASETS: dict[str, DatasetEntry] = {
    "scenes": DatasetEntry(_lazy("sslbench.data.scenes", "load_scenes"), "train", "test",
                           ("classification", "counting", "depth", "segmentation"), needs_root=False,
                           layout="built in (procedural)"),
    "cifar10": DatasetEntry(_lazy("sslbench.data.cifar", "load_cifar10"), "train", "test", ("classification",),
                            layout="cifar-10-batches-py/ (official python pickles)"),
    "cifar100": DatasetEntry(_lazy("sslbench.data.cifar", "load_cifar100"), "train", "test", ("classification",),
                             layout="cifar-100-python/ (official python pickles)"),
    "folder": DatasetEntry(_lazy("sslbench.data.folder", "load_image_folder"), "train", "train", ("classification",),
                           layout="a folder of images (class subfolders optional)"),
    "pets": DatasetEntry(_lazy("sslbench.data.pets", "load_pets"), "trainval", "test", ("segmentation", "classification"),
                         layout="images/ + annotations/trimaps/ + annotations/{trainval,test}.txt"),
    "clevr": DatasetEntry(_lazy("sslbench.data.clevr", "load_clevr"), "train", "val", ("counting",),
                          layout="images/<split>/ + scenes/CLEVR_<split>_scenes.json"),
    "nyu": DatasetEntry(_lazy("sslbench.data.nyu", "load_nyu"), "train", "test", ("depth",),
                        layout="nyu_depth_v2_labeled.mat + splits.mat, or <split>.csv of RGB/16-bit depth PNGs"),
}


def dataset_entry(name: str) -> DatasetEntry:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; use one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def load_dataset(name: str, root: str | Path | None, split: str, image_size: int | None = None,
                 limit: int | None = None) -> ImageSet:
    """Load ``split`` of dataset ``name`` from ``root``, optionally resized and cut to ``limit`` images."""
    entry = dataset_entry(name)
    _check_source(name, entry, root, limit)
    kwargs = {"image_size": image_size} if image_size is not None else {}
    return entry.loader(Path(root) if root is not None else None, split, limit=limit, **kwargs)


def stream_dataset(name: str, root: str | Path | None, split: str, image_size: int | None,
                   limit: int | None = None) -> ImageFiles:
    """``split`` of dataset ``name`` as an ``ImageFiles`` stream, for pretraining on a folder larger than memory.

    Only a plain ``folder`` streams (the other datasets are small, or packed in files that are not one image
    each), and only at a given ``image_size``: a stream cannot check in advance that its images share a size.
    """
    from sslbench.data.folder import ImageFiles

    entry = dataset_entry(name)
    if name != "folder":
        raise ConfigError(f"--stream reads a folder of image files and works with --data folder only; drop --stream to load {name} in memory")
    if image_size is None:
        raise ConfigError("--stream needs --image-size: every streamed image is decoded and resized to that square size")
    _check_source(name, entry, root, limit)
    return ImageFiles.from_folder(Path(root), image_size, split, limit)


def _check_source(name: str, entry: DatasetEntry, root: str | Path | None, limit: int | None) -> None:
    if entry.needs_root and root is None:
        raise DataError(f"dataset {name!r} needs --data-root: the folder holding {entry.layout}")
    if limit is not None and limit < 1:
        raise ConfigError(f"option limit={limit} is out of range; use a positive number of images")


__all__ = ["DATASETS", "IGNORE_INDEX", "ImageSet", "dataset_entry", "load_dataset", "stream_dataset"]
