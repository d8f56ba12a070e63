"""CLEVR v1.0 (Johnson et al., CVPR 2017) with object-count labels.

Layout: ``CLEVR_v1.0/images/<split>/*.png`` and ``scenes/CLEVR_<split>_scenes.json`` (``{"scenes":
[{"image_filename": ..., "objects": [...]}, ...]}``). The count task classifies the number of objects;
the standard variant keeps scenes with 3..10 objects (8 classes).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sslbench.data.base import ImageSet
from sslbench.data.folder import find_dataset_dir, one_line, read_images
from sslbench.errors import ConfigError, DataError

CLEVR_SPLITS = ("train", "val", "test")


def _read_scenes(path: Path, split: str) -> list[dict]:
    if not path.is_file():
        if split == "test":
            raise DataError(f"CLEVR split 'test' has no scene annotations ({path} not found; the official release ships none), so object counts are unknown; use split 'val'")
        raise DataError(f"scene file {path} not found; the CLEVR folder is incomplete")
    try:
        scenes = json.loads(path.read_text())["scenes"]
        return [{"image_filename": str(s["image_filename"]), "count": len(s["objects"])} for s in scenes]
    except Exception as error:  # bad JSON, missing keys, wrong types
        raise DataError(f"cannot read CLEVR scene file {path}: {one_line(error)}; download it again") from None


def load_clevr(
    root: Path,
    split: str,
    image_size: int | None = None,
    limit: int | None = None,
    count_range: tuple[int, int] = (3, 10),
) -> ImageSet:
    """CLEVR ``train``/``val`` scenes whose object count lies in ``count_range`` (inclusive), in scene-file order.

    ``"count"`` targets are class ids ``count - lo`` with ``hi - lo + 1`` classes; ``class_names`` holds
    the counts as strings ("3", "4", ...). ``limit`` keeps the first ``limit`` scenes after filtering.
    """
    if split not in CLEVR_SPLITS:
        raise ConfigError(f"unknown CLEVR split {split!r}; choose one of: {', '.join(CLEVR_SPLITS)}")
    low, high = count_range
    if not 0 <= low <= high:
        raise ConfigError(f"count_range must be (lo, hi) with 0 <= lo <= hi, got {tuple(count_range)}")
    folder = find_dataset_dir(root, "CLEVR_v1.0", "scenes")
    scenes = [s for s in _read_scenes(folder / "scenes" / f"CLEVR_{split}_scenes.json", split) if low <= s["count"] <= high]
    if not scenes:
        raise DataError(f"no CLEVR {split} scene in {folder} has between {low} and {high} objects")
    scenes = scenes[:limit]
    images = read_images([folder / "images" / split / s["image_filename"] for s in scenes], image_size)
    return ImageSet(
        name="clevr",
        images=images,
        targets={"count": torch.tensor([s["count"] - low for s in scenes], dtype=torch.int64)},
        num_classes={"count": high - low + 1},
        class_names=[str(count) for count in range(low, high + 1)],
    )
