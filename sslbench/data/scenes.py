"""The built-in procedural scenes: one dataset with labels for classification, counting, segmentation and depth.

Every scene is a ground plane seen in perspective (a camera at fixed height looking toward a horizon)
carrying 1..6 flat objects that all share one shape class. The four labels come from one rendering, so
they agree with each other:

- ``"class"``: the shape shared by the scene's objects (10 shapes, ``SCENE_CLASS_NAMES``).
- ``"count"``: the number of objects, as a class id in 0..6 (``num_classes["count"] == 7``; id 0 never
  occurs, it keeps ``id == count`` so a count head's error is the count error). Every object keeps at
  least a few visible pixels, so the count is what a viewer can see.
- ``"mask"``: 0 for ground and sky, ``class + 1`` for object pixels (11 mask classes).
- ``"depth"``: metres-like distance of the front-most surface, in (0, 10]. The ground's depth depends only
  on the image row, ``k / (row - horizon)``, clipped to ``MAX_DEPTH`` toward and above the horizon. An
  object at depth ``z`` stands on the row whose ground depth is ``z`` and its size is proportional to
  ``1 / z``, so depth can be read from position, size and texture gradients, as in real images.

Shortcuts are removed on purpose: object colours are random per object (saturated, any hue), the ground
is a random near-grey with a faint random texture (noise, stripes, checker), objects are shaded, tilted by
up to 20 degrees and partly occluded, and pixel noise is added, so class is carried by shape only. The
difficulty is calibrated for the demo's CPU budget: a supervised ResNet-18 (quarter width) reaches 0.95
test accuracy from 4000 images (``benchmarks/scenes_supervised.py``), random-init features stay near chance (kNN about 0.15), and a few
minutes of SimCLR or DDAE pretraining lift every task above random init (see the README's demo table).
An earlier design (smaller, fully rotated objects on saturated, high-contrast textures) left even a
supervised network at 0.25 from 2000 images and every self-supervised encoder at chance.

Scene ``i`` of a split is drawn from a generator seeded with ``(split, i)`` alone, so it is the same
whatever ``limit`` is, run after run. Images are rendered at twice the output size and
average-pooled (anti-aliasing); mask and depth take the label at one of the four sub-samples of each
pixel, the same one for both, so the two always describe the same surface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sslbench.data.base import ImageSet
from sslbench.errors import ConfigError, DataError

SCENE_SPLIT_SIZES = {"train": 20000, "test": 5000}
SCENE_CLASS_NAMES = [
    "disk", "square", "triangle", "star", "cross", "ring", "crescent", "half-disk", "ellipse", "heart",
]
MAX_COUNT = 6
MAX_DEPTH = 10.0
MIN_IMAGE_SIZE = 16

_SEED_SALT = 0x5CE7E5
"""Mixed into every seed so the scenes do not share random streams with other ``(a, b)``-seeded code."""
_SPLIT_IDS = {"train": 0, "test": 1}
_SUPERSAMPLE = 2
_LABEL_SAMPLE = _SUPERSAMPLE // 2
"""Which super-sample of each pixel (per axis) gives the pixel's mask and depth: one, so they always agree."""
_MAX_PLACEMENT_TRIES = 12
_MIN_VISIBLE_PIXELS_AT_32 = 4
"""Labelled pixels an object must show at 32x32 to count as visible; scaled with the image area, at least 3."""


def _inside_shape(shape: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether the points ``(x, y)`` (in the object's frame, bounding radius 1) lie inside ``shape``."""
    radius2 = x * x + y * y
    if shape == 0:  # disk
        return radius2 <= 0.9**2
    if shape == 1:  # square
        return np.maximum(np.abs(x), np.abs(y)) <= 0.68
    if shape == 2:  # equilateral triangle: three half-planes at 120 degrees
        return (y <= 0.5) & (0.866 * x - 0.5 * y <= 0.5) & (-0.866 * x - 0.5 * y <= 0.5)
    if shape == 3:  # five-pointed star: fold the angle onto one point's edge and test that straight edge
        angle = np.abs(np.mod(np.arctan2(y, x) + math.pi / 5, 2 * math.pi / 5) - math.pi / 5)
        radius = np.sqrt(radius2)
        px, py = radius * np.cos(angle), radius * np.sin(angle)
        inner = 0.42
        dx, dy = inner * math.cos(math.pi / 5) - 1.0, inner * math.sin(math.pi / 5)
        return dx * py - dy * (px - 1.0) >= 0
    if shape == 4:  # plus-shaped cross
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= 0.3) & (ay <= 0.95)) | ((ay <= 0.3) & (ax <= 0.95))
    if shape == 5:  # ring
        return (radius2 <= 0.95**2) & (radius2 >= 0.5**2)
    if shape == 6:  # crescent: a disk with an offset disk cut out
        return (radius2 <= 0.95**2) & ((x - 0.45) ** 2 + y * y >= 0.78**2)
    if shape == 7:  # half-disk, centred in its bounding circle
        return (x * x + (y + 0.3) ** 2 <= 0.92**2) & (y >= -0.3)
    if shape == 8:  # ellipse
        return (x / 0.95) ** 2 + (y / 0.45) ** 2 <= 1.0
    # heart: the classic sextic (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled into the unit circle
    hx, hy = x * 1.3, -y * 1.3 + 0.22
    return (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy**3 <= 0


@dataclass
class _SceneLayout:
    """Per-scene camera and ground: horizon row, ground depth law and object size law."""

    horizon: float
    """Horizon row as a fraction of the image height (may lie above the image)."""
    near_depth: float
    """Ground depth at the bottom image row."""
    near_radius: float
    """Image radius (fraction of the image size) of an object standing on the bottom row."""

    def ground_depth(self, rows: np.ndarray, far: float = MAX_DEPTH) -> np.ndarray:
        """Depth of the ground at image rows ``rows`` (fractions of the height), ``far`` at and above the horizon.

        A camera at height h over a flat ground sees the ground at distance proportional to
        ``1 / (row - horizon)``; scaled so the bottom row is at ``near_depth``.
        """
        height = rows - self.horizon
        depth = self.near_depth * (1.0 - self.horizon) / np.maximum(height, 1e-9)
        return np.where(height > 0, np.minimum(depth, far), far)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A near-grey colour for ground, sky and haze: the background varies, but does not out-shout the objects."""
    grey = rng.uniform(0.35, 0.65)
    return np.clip(grey + rng.uniform(-0.04, 0.04, 3), 0, 1)


def _object_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour of random hue (HSV to RGB), independent of the shape class."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)


def _ground_texture(rng: np.random.Generator, layout: _SceneLayout,
                    centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) float32 colours of ground and sky on the super-sampled grid, and the scene's haze colour.

    ``centres`` are the pixel-centre coordinates of both rows and columns (the grid is square).
    """
    # The ground's world coordinates (depth ahead, offset sideways); far rows are capped so texture
    # frequency does not explode at the horizon, where fog hides it anyway.
    depth = layout.ground_depth(centres, far=3 * MAX_DEPTH).astype(np.float32)[:, None]
    columns = centres.astype(np.float32)[None, :]
    sideways = (columns - 0.5) * depth
    kind = rng.integers(3)
    if kind == 0:  # checker
        cell = rng.uniform(0.25, 0.8)
        phase = rng.uniform(0, 1, 2)
        pattern = (np.floor(sideways / cell + phase[0]) + np.floor(depth / cell + phase[1])) % 2
    elif kind == 1:  # stripes at a random angle on the ground
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.3, 1.2)
        phase = rng.uniform(0, 2 * math.pi)
        along = sideways * math.cos(angle) + depth * math.sin(angle)
        pattern = 0.5 + 0.5 * np.sin((2 * math.pi / period) * along + phase)
    else:  # low-frequency blobs in image space
        pattern = np.zeros((len(centres), len(centres)), dtype=np.float32)
        rows = centres.astype(np.float32)[:, None]
        for _ in range(3):
            fx, fy = rng.uniform(-4, 4, 2)
            pattern += np.sin(2 * math.pi * (fx * columns + fy * rows) + rng.uniform(0, 2 * math.pi))
        pattern = 0.5 + pattern / 6
    first, second, sky_top, haze = (_muted_colour(rng) for _ in range(4))
    contrast = rng.uniform(0.05, 0.25)
    # Fog pulls distant ground toward the haze colour, a depth cue that also hides horizon aliasing.
    fog = ((np.minimum(depth, MAX_DEPTH) / MAX_DEPTH) ** 2 * rng.uniform(0.3, 0.9))[None]
    near_colour = (first[:, None, None] * (1 - fog) + haze[:, None, None] * fog).astype(np.float32)
    colour_step = ((second - first)[:, None, None] * (contrast * (1 - fog))).astype(np.float32)
    image = near_colour + colour_step * pattern[None]
    sky_rows = int(np.count_nonzero(centres <= layout.horizon))
    if sky_rows:
        sky_weight = np.clip((layout.horizon - centres[:sky_rows]) / max(layout.horizon, 1e-3), 0, 1)[:, None]
        image[:, :sky_rows] = (haze[:, None, None] + (sky_top - haze)[:, None, None] * sky_weight[None])
    return image, haze


@dataclass
class _SceneObject:
    """One object: where it stands, how big it is, how it is turned and coloured."""

    column: float
    base_row: float
    depth: float
    radius: float
    rotation: float
    colour: np.ndarray

    @property
    def centre_row(self) -> float:
        # The bounding circle touches the ground at the base row, so every object point lies on or above
        # it, where the ground is at least as far as the object: objects are always in front of the ground.
        return self.base_row - self.radius


def _sample_object(rng: np.random.Generator, layout: _SceneLayout) -> _SceneObject:
    # Nearness 1 means standing on the bottom row; depth and image size both follow from it (size ~ 1/depth).
    nearness = rng.uniform(0.55, 1.1)
    return _SceneObject(
        column=rng.uniform(-0.05, 1.05),
        base_row=layout.horizon + nearness * (1.0 - layout.horizon),
        depth=layout.near_depth / nearness,
        radius=layout.near_radius * nearness * rng.uniform(0.85, 1.15),
        rotation=rng.uniform(-0.35, 0.35),
        colour=_object_colour(rng),
    )


def _box(obj: _SceneObject, grid: int) -> tuple[int, int, int, int]:
    """Super-sampled pixel box ``(row0, row1, col0, col1)`` holding the object's bounding circle."""
    row0 = max(0, math.floor((obj.centre_row - obj.radius) * grid))
    row1 = min(grid, math.ceil((obj.centre_row + obj.radius) * grid) + 1)
    col0 = max(0, math.floor((obj.column - obj.radius) * grid))
    col1 = min(grid, math.ceil((obj.column + obj.radius) * grid) + 1)
    return row0, row1, col0, col1


def _local_coordinates(obj: _SceneObject, box: tuple[int, int, int, int], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotated object-frame coordinates (bounding radius 1) of the box's super-sampled pixel centres."""
    row0, row1, col0, col1 = box
    dy = ((np.arange(row0, row1) + 0.5) / grid - obj.centre_row)[:, None] / obj.radius
    dx = ((np.arange(col0, col1) + 0.5) / grid - obj.column)[None, :] / obj.radius
    cos, sin = math.cos(obj.rotation), math.sin(obj.rotation)
    return cos * dx + sin * dy, cos * dy - sin * dx


def _render_ids(objects: list[_SceneObject], shape: int, grid: int) -> np.ndarray:
    """(grid, grid) index of the front-most object at each super-sample, -1 for ground; objects sorted far to near."""
    ids = np.full((grid, grid), -1, dtype=np.int64)
    for index, obj in enumerate(objects):
        box = _box(obj, grid)
        if box[0] < box[1] and box[2] < box[3]:
            x, y = _local_coordinates(obj, box, grid)
            ids[box[0]:box[1], box[2]:box[3]][_inside_shape(shape, x, y)] = index
    return ids


def _label_samples(ids: np.ndarray) -> np.ndarray:
    """The one super-sample per output pixel that mask and depth are read from."""
    return ids[_LABEL_SAMPLE::_SUPERSAMPLE, _LABEL_SAMPLE::_SUPERSAMPLE]


def _place_objects(rng: np.random.Generator, layout: _SceneLayout, shape: int,
                   size: int) -> tuple[list[_SceneObject], np.ndarray]:
    """Objects sorted far to near and their super-sampled id map; each shows at least a few labelled pixels.

    Occlusion or the image border can hide an object. Hidden ones are drawn again a few times, then
    dropped (dropping an object only uncovers the others), so the count is what can be seen.
    """
    grid = size * _SUPERSAMPLE
    min_visible = max(3, math.ceil(_MIN_VISIBLE_PIXELS_AT_32 * (size / 32) ** 2))
    objects = [_sample_object(rng, layout) for _ in range(int(rng.integers(1, MAX_COUNT + 1)))]
    for attempt in range(_MAX_PLACEMENT_TRIES + 1):
        objects.sort(key=lambda obj: -obj.depth)
        ids = _render_ids(objects, shape, grid)
        pixels = np.bincount(_label_samples(ids).ravel() + 1, minlength=len(objects) + 1)[1:]
        visible = pixels >= min_visible
        if visible.all():
            return objects, ids
        if attempt < _MAX_PLACEMENT_TRIES:
            objects = [obj if shown else _sample_object(rng, layout) for obj, shown in zip(objects, visible)]
    objects = [obj for obj, shown in zip(objects, visible) if shown]
    if not objects:  # every draw was hidden (very rare): stand one object mid-image on the bottom row
        objects = [_SceneObject(0.5, 1.0, layout.near_depth, layout.near_radius, 0.0, _object_colour(rng))]
    return objects, _render_ids(objects, shape, grid)


def _paint_objects(image: np.ndarray, objects: list[_SceneObject], ids: np.ndarray, haze: np.ndarray,
                   rng: np.random.Generator) -> None:
    """Paint contact shadows on the ground, then each object's visible pixels, shaded and fogged, into ``image``."""
    grid = ids.shape[0]
    centres = (np.arange(grid) + 0.5) / grid
    fog_strength = rng.uniform(0.2, 0.6)
    light = rng.normal(size=2)
    light = light / max(float(np.linalg.norm(light)), 1e-6)
    for index, obj in enumerate(objects):
        row0, row1, col0, col1 = _box(obj, grid)
        if row0 >= row1 or col0 >= col1:
            continue
        # A flat dark ellipse on the ground where the object stands tells it stands there, not floats.
        shadow0 = max(0, math.floor((obj.base_row - 0.3 * obj.radius) * grid))
        shadow1 = min(grid, math.ceil((obj.base_row + 0.3 * obj.radius) * grid))
        if shadow0 < shadow1:
            sy = ((centres[shadow0:shadow1] - obj.base_row) / (0.25 * obj.radius))[:, None]
            sx = ((centres[col0:col1] - obj.column) / (0.9 * obj.radius))[None, :]
            shadow = 1.0 - 0.45 * np.maximum(1.0 - sx * sx - sy * sy, 0)
            image[:, shadow0:shadow1, col0:col1] *= np.where(ids[shadow0:shadow1, col0:col1] < 0, shadow, 1.0)[None]
        dy = ((centres[row0:row1] - obj.centre_row) / obj.radius)[:, None]
        dx = ((centres[col0:col1] - obj.column) / obj.radius)[None, :]
        shade = 0.8 + 0.3 * (light[0] * dx + light[1] * dy)
        fog = (obj.depth / MAX_DEPTH) ** 2 * fog_strength
        colour = obj.colour * (1 - fog) + haze * fog
        own = ids[row0:row1, col0:col1] == index
        image[:, row0:row1, col0:col1][:, own] = (colour[:, None, None] * shade[None])[:, own]


def _render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int, int, np.ndarray, np.ndarray]:
    """One scene: (3, S, S) uint8 image, class, count, (S, S) mask, (S, S) float32 depth."""
    shape = int(rng.integers(len(SCENE_CLASS_NAMES)))
    layout = _SceneLayout(horizon=rng.uniform(-0.25, 0.3), near_depth=rng.uniform(1.2, 2.5),
                          near_radius=rng.uniform(0.26, 0.34))
    objects, ids = _place_objects(rng, layout, shape, size)
    grid = size * _SUPERSAMPLE
    centres = (np.arange(grid) + 0.5) / grid
    image, haze = _ground_texture(rng, layout, centres)
    _paint_objects(image, objects, ids, haze, rng)

    pooled = sum(image[:, i::_SUPERSAMPLE, j::_SUPERSAMPLE] for i in range(_SUPERSAMPLE) for j in range(_SUPERSAMPLE))
    noisy = pooled / _SUPERSAMPLE**2 + rng.standard_normal(pooled.shape, dtype=np.float32) * rng.uniform(0.0, 0.03)
    pixels = np.clip(noisy * 255.0 + 0.5, 0, 255).astype(np.uint8)

    sampled_ids = _label_samples(ids)
    object_pixels = sampled_ids >= 0
    mask = np.where(object_pixels, shape + 1, 0)
    ground = layout.ground_depth(centres[_LABEL_SAMPLE::_SUPERSAMPLE])[:, None]
    depths = np.array([obj.depth for obj in objects])
    depth = np.where(object_pixels, depths[np.maximum(sampled_ids, 0)], ground).astype(np.float32)
    return pixels, shape, len(objects), mask, depth


def load_scenes(root: Path | None = None, split: str = "train", image_size: int = 32,
                limit: int | None = None) -> ImageSet:
    """Generate ``split`` of the procedural scenes (no files; ``root`` is ignored).

    ``image_size`` is any side length >= 16; ``limit`` cuts the split to its first images, which are the
    same images a full load starts with.
    """
    if split not in SCENE_SPLIT_SIZES:
        raise DataError(f"unknown scenes split {split!r}; choose one of: {', '.join(SCENE_SPLIT_SIZES)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"scenes image_size={image_size!r} is out of range; use an integer >= {MIN_IMAGE_SIZE}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"scenes limit={limit!r} is out of range; use a non-negative number of images")
    count = SCENE_SPLIT_SIZES[split] if limit is None else min(limit, SCENE_SPLIT_SIZES[split])
    images = np.empty((count, 3, image_size, image_size), dtype=np.uint8)
    classes = np.empty(count, dtype=np.int64)
    counts = np.empty(count, dtype=np.int64)
    masks = np.empty((count, image_size, image_size), dtype=np.uint8)
    depths = np.empty((count, image_size, image_size), dtype=np.float32)
    for index in range(count):
        rng = np.random.default_rng([_SEED_SALT, _SPLIT_IDS[split], index])
        images[index], classes[index], counts[index], masks[index], depths[index] = _render_scene(rng, image_size)
    return ImageSet(
        name="scenes",
        images=torch.from_numpy(images),
        targets={
            "class": torch.from_numpy(classes),
            "count": torch.from_numpy(counts),
            "mask": torch.from_numpy(masks).long(),
            "depth": torch.from_numpy(depths),
        },
        num_classes={"class": len(SCENE_CLASS_NAMES), "count": MAX_COUNT + 1, "mask": len(SCENE_CLASS_NAMES) + 1},
        class_names=list(SCENE_CLASS_NAMES),
    )
