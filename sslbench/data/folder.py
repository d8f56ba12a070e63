"""A plain folder of images, plus the decoding and resizing helpers every on-disk loader shares.

``load_image_folder`` reads any folder of images (recursively) for unlabelled pretraining; when every
image sits in a direct subfolder (torchvision ``ImageFolder`` style) the subfolder names become
``"class"`` targets. The helpers below it (``find_dataset_dir``, ``open_image``, ``read_images``, the
resizers) are what the CIFAR, Pet, CLEVR and NYU loaders use too, so every loader reports a missing
folder, a corrupt file and mixed image sizes with the same one-line messages. Per-file work (decode,
resize) runs on a thread pool in PIL/numpy; whole tensors are resized in torch.

``ImageFiles`` is the streaming form of a folder, for folders too large to hold decoded in memory
(ImageNet's 1.28M images are 193 GB as uint8 at 224 px): it keeps only the sorted file paths and
decodes the images a batch asks for, so memory stays one batch per loader worker, at the price of
decoding (and resizing) every image again in every epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sslbench.data.base import ImageSet
from sslbench.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_RESIZE_CHUNK = 512  # images resized at a time, so resizing never holds a float copy of a whole dataset

T = TypeVar("T")
R = TypeVar("R")


def find_dataset_dir(root: Path, folder_name: str, marker: str) -> Path:
    """``root/folder_name`` or ``root`` itself, whichever holds ``marker`` (a file or folder).

    Users point ``--data-root`` either at the extracted dataset folder or at the folder above it;
    both work.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} not found; pass --data-root pointing at the folder that contains {folder_name}/")
    for candidate in (root / folder_name, root):
        if (candidate / marker).exists():
            return candidate
    raise DataError(f"{root} does not hold the expected layout: {root / folder_name / marker} (or {root / marker}) not found")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (decoders sometimes put newlines in theirs)."""
    return " ".join(str(error).split()) or type(error).__name__


def parallel_map(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[function(item) for item in items]`` on a thread pool; PIL releases the GIL while decoding.

    ``function`` must use PIL and numpy only: torch ops called from many threads at once each start
    their own intra-op thread team and oversubscribe the cores (10x slower on 2 cores). Inside a
    DataLoader worker it maps serially: the worker processes already keep the cores busy.
    """
    if len(items) < 16 or torch.utils.data.get_worker_info() is not None:
        return [function(item) for item in items]
    with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
        return pool.map(function, items, chunksize=max(1, len(items) // 64))


def open_image(path: Path) -> Image.Image:
    """The decoded image at ``path``; a file PIL cannot decode raises a ``DataError`` naming it."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DataError(f"image {path} not found; the dataset folder is incomplete") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"cannot read image {path}: {one_line(error)}; remove or replace it") from None
    return image


def read_rgb(path: Path, image_size: int | None = None) -> np.ndarray:
    """The image at ``path`` as ``(H, W, 3)`` uint8 RGB, resized to ``image_size`` square if given."""
    return resize_rgb(np.asarray(open_image(path).convert("RGB")), image_size)


def resize_rgb(pixels: np.ndarray, image_size: int | None) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image resized to ``image_size`` square (PIL bilinear).

    PIL's bilinear resize widens its filter when shrinking, so it is antialiased like ``resize_images``.
    """
    if image_size is None or pixels.shape[:2] == (image_size, image_size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BILINEAR))


def resize_map_nearest(label_map: np.ndarray, image_size: int | None) -> np.ndarray:
    """An ``(H, W)`` uint8 label map or float32 depth map resized by nearest neighbour (see ``resize_nearest``)."""
    if image_size is None or label_map.shape == (image_size, image_size):
        return label_map
    return np.asarray(Image.fromarray(label_map).resize((image_size, image_size), Image.Resampling.NEAREST))


def read_images(paths: Sequence[Path], image_size: int | None = None) -> torch.Tensor:
    """The images at ``paths`` as one ``(N, 3, H, W)`` uint8 tensor (decoded on a thread pool)."""
    return to_channels_first(stack_same_size(parallel_map(lambda path: read_rgb(path, image_size), paths), paths))


def to_channels_first(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 numpy images as a contiguous ``(N, 3, H, W)`` tensor."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def stack_same_size(arrays: Sequence[np.ndarray], paths: Sequence[Path]) -> np.ndarray:
    """``np.stack(arrays)`` of ``(H, W, ...)`` arrays, or a ``DataError`` naming two files of different sizes."""
    if not arrays:
        raise DataError("no images to load")
    first = arrays[0].shape[:2]
    for array, path in zip(arrays, paths):
        if array.shape[:2] != first:
            raise DataError(
                f"images have different sizes ({first[1]}x{first[0]} in {paths[0]}, "
                f"{array.shape[1]}x{array.shape[0]} in {path}); pass --image-size to resize them to one size"
            )
    return np.stack(arrays)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, 3, H, W)`` uint8 resized to ``(N, 3, size, size)`` with antialiased bilinear filtering."""
    if images.shape[-2:] == (size, size):
        return images
    chunks = []
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = images[start:start + _RESIZE_CHUNK].float()
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        chunks.append(chunk.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(chunks)


def resize_nearest(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, H, W)`` label or depth maps resized to ``(N, size, size)`` by nearest neighbour.

    Labels and depth must not be blended (a blend of class ids is another class; a blend of a valid
    depth with the invalid 0 is a wrong depth), so each output pixel copies the input pixel its centre
    falls on (PIL's NEAREST, torch's ``nearest-exact``). Done by indexing, so any dtype stays exact.
    """
    height, width = maps.shape[-2:]
    if (height, width) == (size, size):
        return maps
    rows = ((torch.arange(size) + 0.5) * (height / size)).long().clamp_(max=height - 1)
    cols = ((torch.arange(size) + 0.5) * (width / size)).long().clamp_(max=width - 1)
    return maps[..., rows, :][..., cols]


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def folder_images(root: Path, split: str) -> tuple[Path, list[Path]]:
    """The folder to read (``root/split`` when that folder exists, else ``root``) and its images, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} not found; pass --data-root pointing at the folder that contains the images")
    folder = root / split if (root / split).is_dir() else root
    paths = list_images(folder)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return folder, paths


def load_image_folder(root: Path, split: str = "train", image_size: int | None = None, limit: int | None = None) -> ImageSet:
    """Every image under ``root`` (or under ``root/split`` when that folder exists), sorted by path.

    Images are converted to RGB. When each image sits in a direct subfolder of the folder, the
    subfolder names (sorted) are the classes and the set gets ``"class"`` targets; otherwise it is
    unlabelled. ``image_size`` is required unless all images share one size.
    """
    folder, paths = folder_images(root, split)
    relative = [p.relative_to(folder).parts for p in paths]
    is_class_folder = all(len(parts) == 2 for parts in relative)
    paths = paths if limit is None else paths[:limit]
    images = read_images(paths, image_size)
    targets: dict[str, torch.Tensor] = {}
    num_classes: dict[str, int] = {}
    class_names = None
    if is_class_folder:
        class_names = sorted({parts[0] for parts in relative})
        index = {name: i for i, name in enumerate(class_names)}
        targets["class"] = torch.tensor([index[parts[0]] for parts in relative[: len(paths)]], dtype=torch.int64)
        num_classes["class"] = len(class_names)
    return ImageSet(name=folder.name, images=images, targets=targets, num_classes=num_classes, class_names=class_names)


class ImageFiles:
    """The images of a folder as files on disk, decoded and resized to ``image_size`` square on demand.

    The streaming twin of ``load_image_folder`` for pretraining (``engine.StreamedBatches`` decodes one
    batch per item in DataLoader workers): only the paths live in memory, so a folder of any size
    trains, but every epoch pays the decoding again. One square ``image_size`` is required because a
    stream cannot look at every image first to check that they share a size. Decoding goes through
    ``read_images``, so pixels equal ``load_image_folder``'s at the same size and a corrupt file raises
    the same one-line ``DataError``, when the batch holding it is decoded.
    """

    def __init__(self, paths: Sequence[Path], image_size: int):
        if not paths:
            raise DataError("no image files to stream")
        if image_size < 1:
            raise ConfigError(f"image size {image_size} is out of range; pass a positive --image-size")
        # One numpy byte array instead of a list of Path objects: DataLoader workers forked from this process
        # touch every Python object's reference count and so copy a list's memory page by page; an array is
        # one object (and pickles as one buffer when a worker gets its copy).
        self.paths = np.array([os.fsencode(path) for path in paths])
        self.image_size = image_size

    @classmethod
    def from_folder(cls, root: Path, image_size: int, split: str = "train", limit: int | None = None) -> ImageFiles:
        """The images under ``root`` (or ``root/split`` when it exists), sorted by path, as ``load_image_folder`` lists them."""
        paths = folder_images(root, split)[1]
        return cls(paths if limit is None else paths[:limit], image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> Path:
        return Path(os.fsdecode(self.paths[index]))

    def decode(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` as one ``(B, 3, S, S)`` uint8 tensor, in the order given."""
        return read_images([self.path(int(index)) for index in indices], self.image_size)

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` images drawn without replacement by ``generator`` (every image when ``count >= len(self)``),
        decoded in path order: a bounded stand-in for the whole set where a method fits data-dependent state."""
        if count >= len(self):
            return self.decode(range(len(self)))
        return self.decode(torch.randperm(len(self), generator=generator)[:count].sort().values)
