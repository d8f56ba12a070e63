"""Oxford-IIIT Pet (Parkhi et al., "Cats and Dogs", CVPR 2012) in its official layout.

``oxford-iiit-pet/images/<name>.jpg``, ``annotations/trimaps/<name>.png`` (1 pet, 2 background,
3 border) and the split lists ``annotations/trainval.txt`` / ``test.txt`` with lines
``Abyssinian_100 1 1 1`` (name, class id 1..37, species 1 cat / 2 dog, breed id within species).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sslbench.data.base import IGNORE_INDEX, ImageSet
from sslbench.data.folder import (
    find_dataset_dir,
    open_image,
    parallel_map,
    read_rgb,
    resize_map_nearest,
    resize_rgb,
    stack_same_size,
    to_channels_first,
)
from sslbench.errors import ConfigError, DataError

PET_SPLITS = {"trainval": "trainval", "train": "trainval", "test": "test"}
PET_BREEDS = [
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal", "Birman",
    "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel", "english_setter",
    "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond", "leonberger", "Maine_Coon",
    "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll", "Russian_Blue", "saint_bernard",
    "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx", "staffordshire_bull_terrier", "wheaten_terrier",
    "yorkshire_terrier",
]
"""Breed names in the order of the official class ids 1..37 (``list.txt``)."""

# Trimap value (1 pet, 2 background, 3 border) -> mask class, for 2 and 3 mask classes.
_TRIMAP_TO_MASK = {2: [IGNORE_INDEX, 1, 0, IGNORE_INDEX], 3: [IGNORE_INDEX, 1, 0, 2]}


def _read_split_list(path: Path) -> list[tuple[str, int, int]]:
    """(name, class index 0..36, species index 0..1) for every line of an official split list."""
    if not path.is_file():
        raise DataError(f"split list {path} not found; the Oxford-IIIT Pet annotations are incomplete")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            name, class_id, species = fields[0], int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            raise DataError(f"{path} line {number} is {line.strip()!r}; expected 'NAME CLASS-ID SPECIES BREED-ID'") from None
        if not (1 <= class_id <= len(PET_BREEDS) and species in (1, 2)):
            raise DataError(f"{path} line {number}: class id {class_id} or species {species} out of range (1..37, 1..2)")
        entries.append((name, class_id - 1, species - 1))
    if not entries:
        raise DataError(f"split list {path} lists no images")
    return entries


def _read_pair(folder: Path, name: str, image_size: int | None, mask_lookup: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``(H, W, 3)`` image and (when ``mask_lookup`` is given) its trimap mapped to mask classes, both resized."""
    image_path = folder / "images" / f"{name}.jpg"
    image = read_rgb(image_path)
    mask = None
    if mask_lookup is not None:
        trimap_path = folder / "annotations" / "trimaps" / f"{name}.png"
        trimap = np.asarray(open_image(trimap_path))
        if trimap.shape != image.shape[:2]:
            raise DataError(f"trimap {trimap_path} has shape {trimap.shape} but its image {image_path} is {image.shape[:2]}")
        if trimap.min() < 1 or trimap.max() > 3:
            raise DataError(f"trimap {trimap_path} has values outside 1..3 (pet, background, border)")
        mask = resize_map_nearest(mask_lookup[trimap], image_size)
    if image_size is not None:
        image = resize_rgb(image, image_size)
    return image, mask


def load_pets(
    root: Path,
    split: str,
    image_size: int | None = None,
    limit: int | None = None,
    mask_classes: int = 2,
    with_masks: bool = True,
) -> ImageSet:
    """Oxford-IIIT Pet ``trainval`` (also called ``train``) or ``test``, in split-list order.

    Targets: ``"mask"`` from the trimaps (``mask_classes=2``: background 0, pet 1, border ignored;
    ``mask_classes=3``: background 0, pet 1, border 2), ``"class"`` the breed (0..36 from the official
    class id, also on subsets) and ``"species"`` (0 cat, 1 dog). ``with_masks=False`` skips the trimaps
    for classification-only use. The official images differ in size, so pass ``image_size``.
    """
    if split not in PET_SPLITS:
        raise ConfigError(f"unknown Oxford-IIIT Pet split {split!r}; choose one of: {', '.join(PET_SPLITS)}")
    if mask_classes not in _TRIMAP_TO_MASK:
        raise ConfigError(f"mask_classes must be 2 (pet/background, border ignored) or 3 (pet/background/border), got {mask_classes}")
    folder = find_dataset_dir(root, "oxford-iiit-pet", "annotations")
    entries = _read_split_list(folder / "annotations" / f"{PET_SPLITS[split]}.txt")[:limit]
    lookup = np.array(_TRIMAP_TO_MASK[mask_classes], dtype=np.uint8) if with_masks else None
    pairs = parallel_map(lambda entry: _read_pair(folder, entry[0], image_size, lookup), entries)
    paths = [folder / "images" / f"{name}.jpg" for name, _, _ in entries]
    targets = {
        "class": torch.tensor([cls for _, cls, _ in entries], dtype=torch.int64),
        "species": torch.tensor([species for _, _, species in entries], dtype=torch.int64),
    }
    num_classes = {"class": len(PET_BREEDS), "species": 2}
    if with_masks:
        targets["mask"] = torch.from_numpy(stack_same_size([mask for _, mask in pairs], paths)).long()
        num_classes["mask"] = mask_classes
    return ImageSet(
        name="oxford_pets",
        images=to_channels_first(stack_same_size([image for image, _ in pairs], paths)),
        targets=targets,
        num_classes=num_classes,
        class_names=list(PET_BREEDS),
    )
