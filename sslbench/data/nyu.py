"""NYU Depth V2 (Silberman et al., ECCV 2012) RGB-D images with metric depth.

Two layouts are read, whichever ``root`` holds:

* the labeled release: ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5) with ``images``
  (1449, 3, 640, 480) uint8 and ``depths`` (1449, 640, 480) float32 metres, stored transposed because
  MATLAB is column-major, plus the official split ``splits.mat`` (``trainNdxs`` 795 / ``testNdxs`` 654,
  1-based indices);
* a folder layout: ``<split>.csv`` (or ``.txt``) with lines ``rgb_path,depth_path`` relative to
  ``root``, RGB PNG/JPG images and 16-bit PNG depth in millimetres (0 = no depth).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sslbench.data.base import ImageSet
from sslbench.data.folder import (
    find_dataset_dir,
    one_line,
    open_image,
    parallel_map,
    read_rgb,
    resize_images,
    resize_map_nearest,
    resize_nearest,
    resize_rgb,
    stack_same_size,
    to_channels_first,
)
from sslbench.errors import ConfigError, DataError

LABELED_FILE = "nyu_depth_v2_labeled.mat"
SPLITS_FILE = "splits.mat"
_MAT_SPLITS = {"train": "trainNdxs", "test": "testNdxs"}
_MAT_CHUNK = 64  # images read from the .mat at a time, so resizing never holds the full-size split
_EIGEN_CROP_480x640 = (45, 471, 41, 601)  # rows 45:471, cols 41:601 (Eigen et al., NeurIPS 2014)


def nyu_eval_crop(height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the Eigen evaluation crop scaled to a ``height`` x ``width`` map.

    Metrics are computed on ``depth[top:bottom, left:right]``; on 480x640 this is rows 45:471 and
    columns 41:601, the crop every NYU depth paper since Eigen et al. (2014) reports. Other sizes
    scale each bound and round down, as ``int(45 / 480 * height)`` does in the common evaluation code.
    """
    top, bottom, left, right = _EIGEN_CROP_480x640
    return (top * height // 480, bottom * height // 480, left * width // 640, right * width // 640)


def _split_indices(path: Path, split: str) -> np.ndarray:
    """0-based indices of ``split`` from the official ``splits.mat``."""
    import scipy.io

    if not path.is_file():
        raise DataError(f"{path} not found; download the official NYU Depth V2 split file splits.mat next to {LABELED_FILE}")
    try:
        indices = scipy.io.loadmat(str(path))[_MAT_SPLITS[split]]
    except Exception as error:  # not a .mat, truncated, or missing the variable
        raise DataError(f"cannot read NYU split file {path}: {one_line(error)}; download it again") from None
    return np.asarray(indices).astype(np.int64).reshape(-1) - 1


def _load_labeled_mat(folder: Path, split: str, image_size: int | None, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    import h5py

    path = folder / LABELED_FILE
    indices = _split_indices(folder / SPLITS_FILE, split)[:limit]
    images, depths = [], []
    try:
        with h5py.File(path, "r") as mat:
            count = mat["images"].shape[0]
            if len(indices) and (indices.min() < 0 or indices.max() >= count):
                raise DataError(f"{folder / SPLITS_FILE} indexes images up to {indices.max() + 1} but {path} holds {count}")
            for start in range(0, len(indices), _MAT_CHUNK):
                chunk = indices[start:start + _MAT_CHUNK]
                # h5py reads increasing indices only; read sorted, then put back in split order
                unique, pick = np.unique(chunk, return_inverse=True)
                image = torch.from_numpy(mat["images"][unique][pick]).transpose(2, 3).contiguous()  # (n, 3, H, W)
                depth = torch.from_numpy(np.asarray(mat["depths"][unique][pick], dtype=np.float32)).transpose(1, 2).contiguous()
                if image_size is not None:
                    image, depth = resize_images(image, image_size), resize_nearest(depth, image_size)
                images.append(image)
                depths.append(depth)
    except DataError:
        raise
    except Exception as error:  # not HDF5, truncated, or missing the images/depths datasets
        raise DataError(f"cannot read NYU file {path}: {one_line(error)}; download nyu_depth_v2_labeled.mat again") from None
    if not images:
        raise DataError(f"NYU split {split!r} in {folder / SPLITS_FILE} is empty")
    return torch.cat(images), torch.cat(depths)


def _read_depth_png(path: Path) -> np.ndarray:
    """A 16-bit depth PNG in millimetres as (H, W) float32 metres."""
    image = open_image(path)
    if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise DataError(f"depth image {path} has mode {image.mode}; expected a 16-bit PNG in millimetres")
    return np.asarray(image).astype(np.float32) / 1000.0


def _read_list(path: Path, folder: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(",") if "," in line else line.split()
        if len(fields) != 2:
            raise DataError(f"{path} line {number} is {line!r}; expected 'rgb_path,depth_path'")
        pairs.append((folder / fields[0].strip(), folder / fields[1].strip()))
    if not pairs:
        raise DataError(f"{path} lists no images")
    return pairs


def _load_folder_layout(list_path: Path, image_size: int | None, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = _read_list(list_path, list_path.parent)[:limit]

    def read_pair(pair: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
        image, depth = read_rgb(pair[0]), _read_depth_png(pair[1])
        if depth.shape != image.shape[:2]:
            raise DataError(f"depth {pair[1]} is {depth.shape[1]}x{depth.shape[0]} but its image {pair[0]} is {image.shape[1]}x{image.shape[0]}")
        return resize_rgb(image, image_size), resize_map_nearest(depth, image_size)

    loaded = parallel_map(read_pair, pairs)
    paths = [rgb for rgb, _ in pairs]
    images = to_channels_first(stack_same_size([image for image, _ in loaded], paths))
    return images, torch.from_numpy(stack_same_size([depth for _, depth in loaded], paths))


def load_nyu(root: Path, split: str, image_size: int | None = None, limit: int | None = None) -> ImageSet:
    """NYU Depth V2 ``train`` (795) or ``test`` (654) with ``"depth"`` targets in metres (0 = unknown).

    Reads ``nyu_depth_v2_labeled.mat`` + ``splits.mat`` when present, else ``<split>.csv``/``.txt``.
    Depth is resized by nearest neighbour so that invalid zeros never blend into valid depth.
    """
    root = Path(root)
    if (root / LABELED_FILE).is_file() or (root / "nyu_depth_v2" / LABELED_FILE).is_file():
        if split not in _MAT_SPLITS:
            raise ConfigError(f"unknown NYU Depth V2 split {split!r}; the official splits.mat has: {', '.join(_MAT_SPLITS)}")
        images, depths = _load_labeled_mat(find_dataset_dir(root, "nyu_depth_v2", LABELED_FILE), split, image_size, limit)
    else:
        if not root.is_dir():
            raise DataError(f"dataset folder {root} not found; pass --data-root pointing at the folder that contains {LABELED_FILE}")
        lists = [root / f"{split}.csv", root / f"{split}.txt"]
        existing = [path for path in lists if path.is_file()]
        if not existing:
            raise DataError(
                f"no NYU Depth V2 data in {root}: expected {LABELED_FILE} + {SPLITS_FILE} (official labeled release) "
                f"or {lists[0].name} listing 'rgb_path,depth_path' lines (folder layout)"
            )
        images, depths = _load_folder_layout(existing[0], image_size, limit)
    return ImageSet(name="nyu_depth_v2", images=images, targets={"depth": depths})
