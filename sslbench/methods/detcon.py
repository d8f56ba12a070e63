"""DetCon (Hénaff et al. 2021, "Efficient Visual Pretraining with Contrastive Detection"): DetCon_S, DetCon_B.

Every training image carries a segmentation: Felzenszwalb-Huttenlocher (FH) segments computed once per
dataset (the paper's unsupervised masks; cached in memory and on disk), or the dataset's ground-truth
``mask`` target (``mask_source=ground_truth``). Both views are cut from the image by one crop/flip/rotation
grid that also warps the mask (``augment_with_masks``); K segment ids are drawn per image among the
segments visible in both views, and the encoder's deepest feature map is averaged under each segment
(``masked_pool``). The objectives then compare mask vectors instead of image vectors:

- DetCon_S (SimCLR + contrastive detection, paper eq. 3): a projection MLP and a cross-entropy at
  temperature 0.1 in which a mask vector must find the same segment of the same image in the other
  view among all other mask vectors of both views of the whole (all-process) batch.
- DetCon_B (BYOL + masks; the paper's and the released code's): BYOL's online projector and predictor and
  EMA target; the same loss of eq. 3, with the online predictions as queries and the target's
  projections as keys (``objective=contrastive``, the default). ``objective=regression`` replaces it with
  BYOL's loss (eq. 2) per mask: each prediction regresses the target projection of the same segment in
  the other view, with no negatives. The paper does not train that variant; it was sslbench's DetCon_B
  until the C10-mini runs showed it barely learning (see benchmarks/results/methods_c10_mini.md).

Small-image defaults: K = 8 ids per image (the paper draws 16 at 224 px). FH with scale 100, sigma 0.8,
min_size 20 px (2% of a 32x32 image) gives about 11 segments per 32 px scene. DetCon_S uses SimCLR's
views and projection sizes, DetCon_B BYOL's. At 32 px the deepest ResNet map is 4x4, so masks are
pooled with area weights (a segment covering a quarter of a cell counts a quarter) instead of being
binarised at that resolution. The scenes' ground truth is semantic (ground and sky vs the one shape
class of the scene's objects), so it gives at most two segments per scene; FH splits objects apart.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from sslbench.augment import host_to_device
from sslbench.backbones import Encoder
from sslbench.config import check_range
from sslbench.data import DATASETS, IGNORE_INDEX
from sslbench.errors import ConfigError, DataError
from sslbench.methods.base import PretrainMethod, simclr_view
from sslbench.methods.byol import BYOL, BYOLOptions, byol_loss, byol_views
from sslbench.methods.parts import MLPHead, frozen_copy, gather_no_grad, gather_with_grad, masked_pool, rank

MASK_SOURCES = ("fh", "ground_truth")
MASK_IDS = IGNORE_INDEX + 1
"""Masks are uint8: ids 0..254 name segments, ``IGNORE_INDEX`` (255) marks pixels that belong to none."""

_FH_MEMORY: dict[str, torch.Tensor] = {}
"""The FH masks of the most recent (images, parameters), so repeated runs in one process skip the disk too."""


def fh_cache_key(images: torch.Tensor, scale: float, sigma: float, min_size: int) -> str:
    """A hash of the images' bytes and the FH parameters: the name of their cached masks."""
    digest = hashlib.sha256(repr((tuple(images.shape), float(scale), float(sigma), int(min_size))).encode())
    digest.update(images.cpu().contiguous().numpy().data)
    return digest.hexdigest()[:24]


def felzenszwalb_masks(images: torch.Tensor, scale: float, sigma: float, min_size: int,
                       cache_dir: Path | None = None) -> torch.Tensor:
    """FH segments (Felzenszwalb & Huttenlocher 2004, ``skimage.segmentation.felzenszwalb``) of uint8
    images (N, 3, H, W): uint8 ids (N, H, W), computed once per (images, parameters).

    The result is kept in memory and, with ``cache_dir``, in ``fh-masks-<hash>.npy`` there, so a resumed
    or second run on the same images loads it instead of segmenting again.
    """
    key = fh_cache_key(images, scale, sigma, min_size)
    path = cache_dir / f"fh-masks-{key}.npy" if cache_dir is not None else None
    masks = _FH_MEMORY.get(key)
    if masks is None and path is not None:
        masks = _load_cached_masks(path, (images.shape[0], *images.shape[2:]))
    if masks is None:
        masks = _segment(images, scale, sigma, min_size)
    if path is not None and not path.is_file():  # also when memory answered: a later process finds them here
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes of one DDP job write in turn
        with open(tmp, "wb") as handle:
            np.save(handle, masks.numpy())
        os.replace(tmp, path)
    _FH_MEMORY.clear()
    _FH_MEMORY[key] = masks
    return masks


def _load_cached_masks(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The masks stored at ``path``, or None when there are none (or they are unreadable or of another shape)."""
    if not path.is_file():
        return None
    try:
        stored = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if stored.shape != shape or stored.dtype != np.uint8:
        return None
    return torch.from_numpy(stored)


def _segment(images: torch.Tensor, scale: float, sigma: float, min_size: int) -> torch.Tensor:
    from skimage.segmentation import felzenszwalb

    pixels = images.cpu().permute(0, 2, 3, 1).numpy()
    masks = np.empty(pixels.shape[:3], dtype=np.uint8)
    for index, image in enumerate(pixels):
        segments = felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size)
        if segments.max() >= IGNORE_INDEX:
            raise ConfigError(f"FH split image {index} into {segments.max() + 1} segments, more than the {IGNORE_INDEX} "
                              f"a mask holds; raise fh_min_size (now {min_size}) or fh_scale (now {scale})")
        masks[index] = segments
    return torch.from_numpy(masks)


def segments_present(masks: torch.Tensor) -> torch.Tensor:
    """(B, 256) bool: which ids occur in each uint8 mask (B, H, W); ``IGNORE_INDEX`` never counts."""
    present = torch.zeros(len(masks), MASK_IDS, dtype=torch.bool, device=masks.device)
    present.scatter_(1, masks.flatten(1).long(), True)
    present[:, IGNORE_INDEX] = False
    return present


def sample_mask_ids(masks1: torch.Tensor, masks2: torch.Tensor, num_masks: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K segment ids per image, uniform with replacement (as the released DetCon code) over the segments
    present in both views' masks (B, S, S); an image sharing none falls back to the segments of either.

    Returns ``ids`` (B, K) long and ``present1``, ``present2`` (B, K) bool, whether each id is visible in
    each view: a segment the crop removed from a view gets weight 0 in the losses. The uniform draws come
    from the CPU ``generator`` (views and ids replay exactly on resume, on any device); picking the r-th
    candidate by a cumulative count keeps the rest on the masks' device.
    """
    present1, present2 = segments_present(masks1), segments_present(masks2)
    both = present1 & present2
    candidates = torch.where(both.any(1, keepdim=True), both, present1 | present2)
    counts = candidates.sum(1, keepdim=True)
    draws = host_to_device(torch.rand(len(masks1), num_masks, generator=generator), candidates.device)
    wanted = (draws * counts).long() + 1  # the 1-based rank of the candidate each draw picks
    ids = torch.searchsorted(candidates.long().cumsum(1), wanted).clamp(max=IGNORE_INDEX)  # no candidate: ignore id
    return ids, present1.gather(1, ids), present2.gather(1, ids)


def detcon_loss(z1: torch.Tensor, z2: torch.Tensor, ids: torch.Tensor, present1: torch.Tensor, present2: torch.Tensor,
                temperature: float, targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Contrastive detection loss (DetCon paper eq. 3, batched as the released code's ``byol_nce_detcon``).

    ``z1``, ``z2`` (B, K, D) are the query mask vectors of the two views for the segment ids ``ids``
    (B, K) (the same ids in both views); ``present1``/``present2`` (B, K) say whether the segment is in
    each view. The keys are ``targets`` (the same shapes; DetCon_B: the momentum target's projections, no
    gradient) or, without them, the queries themselves (DetCon_S). With v the L2-normalised vectors, the
    query (view a, image b, sample k) scores every key (view a', image b', sample k') of both views of the
    global batch by v.v'/tau, except keys of its own view with the same (image, id) (itself and repeated
    draws) and keys absent from their view. Its positives P are the keys of the other view with the same
    (image, id); loss_q = -(1/|P|) sum_{p in P} log softmax_p. A query counts when its segment is in both
    views, with weight 1/(number of draws of that id in the image), so every segment counts once; the
    weighted sum is divided by the number of queries 2BK, the same on every process, so under DDP the
    averaged gradients equal one process on the whole batch. (The released code sums the two views'
    means; this averages them, as sslbench's BYOL does.)
    """
    batch, num = ids.shape
    device = z1.device
    queries = F.normalize(torch.stack([z1, z2]).float(), dim=-1)  # (2, B, K, D)
    if targets is None:
        keys = torch.stack([gather_with_grad(queries[0]), gather_with_grad(queries[1])])  # (2, WB, K, D)
    else:
        keys = gather_no_grad(F.normalize(torch.stack(targets).float(), dim=-1).transpose(0, 1)).transpose(0, 1)
    key_ids = gather_no_grad(ids)
    key_present = gather_no_grad(torch.stack([present1, present2], 1).to(torch.uint8)).transpose(0, 1).bool()
    first_image = rank() * batch

    def labels(images: torch.Tensor, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(view, global image, segment id) of every entry of a (2, n, K) stack, flattened."""
        shape = (2, len(images), num)
        view = torch.arange(2, device=device).view(2, 1, 1).expand(shape)
        return view.flatten(), images.view(1, -1, 1).expand(shape).flatten(), sample_ids.expand(shape).flatten()

    query_view, query_image, query_id = labels(torch.arange(batch, device=device) + first_image, ids)
    key_view, key_image, key_id = labels(torch.arange(keys.shape[1], device=device), key_ids)
    same_segment = (query_image[:, None] == key_image[None]) & (query_id[:, None] == key_id[None])
    same_view = query_view[:, None] == key_view[None]
    key_ok = key_present.flatten()[None]
    positive = same_segment & ~same_view & key_ok
    # A large finite negative rather than -inf: a query whose keys are all excluded stays finite (weight 0).
    logits = (queries.flatten(0, 2) @ keys.flatten(0, 2).t() / temperature).masked_fill(~key_ok | (same_segment & same_view), -1e9)
    log_prob = F.log_softmax(logits, dim=1)
    positives = positive.sum(1)
    per_query = -torch.where(positive, log_prob, 0.0).sum(1) / positives.clamp(min=1)
    draws = (ids[:, :, None] == ids[:, None, :]).sum(2)  # (B, K): how often each sample's id was drawn
    weight = (torch.stack([present1, present2]).flatten() & (positives > 0)) / draws.repeat(2, 1).flatten()
    return (weight * per_query).sum() / len(per_query)


def detcon_b_regression_loss(prediction1: torch.Tensor, prediction2: torch.Tensor, target1: torch.Tensor, target2: torch.Tensor,
                  valid: torch.Tensor) -> torch.Tensor:
    """BYOL's loss (eq. 2) per mask: each view's prediction of sample k regresses the target projection of
    sample k (the same segment) in the other view, symmetrised.

    Inputs are (B, K, D); ``valid`` (B, K) marks segments present in both views. The mean runs over all
    B*K samples with an invalid one counting zero: both its vectors are replaced by the same unit vector,
    whose 2 - 2 cos is exactly 0 and which passes no gradient. The denominator is then the same on every
    process (DDP's averaged gradients equal one process on the whole batch).
    """
    keep = valid.unsqueeze(-1)
    unit = torch.zeros(prediction1.shape[-1], device=prediction1.device, dtype=prediction1.dtype)
    unit[0] = 1.0

    def regress(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return byol_loss(torch.where(keep, prediction, unit).flatten(0, 1), torch.where(keep, target, unit.to(target.dtype)).flatten(0, 1))

    return (regress(prediction1, target2) + regress(prediction2, target1)) / 2


@dataclass
class DetConOptions:
    """Where the masks come from and how many are drawn per image (shared by DetCon_S and DetCon_B)."""

    mask_source: Literal["fh", "ground_truth"] = "fh"
    num_masks: int = 8
    fh_scale: float = 100.0
    fh_sigma: float = 0.8
    fh_min_size: int = 20

    def __post_init__(self) -> None:
        if self.mask_source not in MASK_SOURCES:
            raise ConfigError(f"option mask_source={self.mask_source!r} is not allowed; use one of {', '.join(MASK_SOURCES)}")
        check_range("num_masks", self.num_masks, 1)
        check_range("fh_sigma", self.fh_sigma, 0.0)
        check_range("fh_min_size", self.fh_min_size, 1)
        if not self.fh_scale > 0:
            raise ConfigError(f"option fh_scale={self.fh_scale} is out of range; use a positive value (larger: bigger segments)")


class DetCon(PretrainMethod):
    """The shared half of DetCon_S and DetCon_B: masks, views that carry them, id sampling, mask pooling."""

    needs_masks = True
    options: DetConOptions

    @classmethod
    def dataset_masks(cls, options: DetConOptions, images: torch.Tensor, given: torch.Tensor | None,
                      cache_dir: Path) -> torch.Tensor:
        if options.mask_source == "fh":
            return felzenszwalb_masks(images, options.fh_scale, options.fh_sigma, options.fh_min_size, cache_dir)
        if given is None:
            with_masks = ", ".join(name for name, entry in DATASETS.items() if "segmentation" in entry.tasks)
            raise DataError(f"mask_source=ground_truth needs a dataset with a 'mask' target ({with_masks}) and this one "
                            "has none; use --set mask_source=fh for unsupervised FH masks")
        if given.is_floating_point() or int(given.min()) < 0 or int(given.max()) > IGNORE_INDEX:
            raise DataError(f"ground-truth masks must hold integer ids in [0, {IGNORE_INDEX}] ({IGNORE_INDEX} = ignore); "
                            f"got {given.dtype} values in [{given.min()}, {given.max()}]")
        return given.to(torch.uint8)

    def export_meta(self) -> dict[str, Any]:
        source = self.options.mask_source
        return {"mask_source": source, "label": f"{self.name}[{source}]"}

    def views_and_segments(self, images: torch.Tensor, masks: torch.Tensor,
                           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both views stacked (2B, 3, S, S), each view's binary mask of every drawn id (2B, K, S, S), and
        ``sample_mask_ids``' ids and per-view presence."""
        views, view_masks = self.views.with_masks(images, masks, generator)
        ids, present1, present2 = sample_mask_ids(view_masks[0], view_masks[1], self.options.num_masks, generator)
        binary = torch.cat([m.unsqueeze(1) == ids[:, :, None, None] for m in view_masks])
        return torch.cat(views), binary.to(views[0].dtype), ids, present1, present2

    @staticmethod
    def mask_vectors(encoder: Encoder, views: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
        """Mask-pooled vectors (2B * K, C) of the deepest (coarsest) feature map, the one the paper pools."""
        maps = encoder(views).maps
        return masked_pool(maps[max(maps)], binary).flatten(0, 1)

    @property
    def pooled_channels(self) -> int:
        return self.encoder.map_channels[max(self.encoder.map_channels)]


@dataclass
class DetConSOptions(DetConOptions):
    temperature: float = 0.1
    projection_hidden: int = 512
    projection_dim: int = 128


class DetConS(DetCon):
    name = "detcon_s"
    Options = DetConSOptions

    def build(self) -> None:
        o = self.options
        self.projection = MLPHead([self.pooled_channels, o.projection_hidden, o.projection_dim])
        view = simclr_view(self.image_size)
        self.views = self.make_views([view, view])

    def masked_training_loss(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        views, binary, ids, present1, present2 = self.views_and_segments(images, masks, generator)
        z1, z2 = self.projection(self.mask_vectors(self.encoder, views, binary)).view(2, *ids.shape, -1)
        loss = detcon_loss(z1, z2, ids, present1, present2, self.options.temperature)
        return loss, {"masks_in_both_views": (present1 & present2).float().mean()}


DETCON_B_OBJECTIVES = ("contrastive", "regression")


@dataclass
class DetConBOptions(DetConOptions, BYOLOptions):
    """The mask options of DetCon with BYOL's heads, momentum schedule and views (BYOL's defaults).

    ``objective``: ``contrastive`` is the paper's and the released code's DetCon_B, eq. 3 between the online
    predictions and the target's projections (negatives: the other masks of the batch) at ``temperature``;
    ``regression`` is BYOL's loss per mask (no negatives), a variant the paper does not train."""

    objective: Literal["contrastive", "regression"] = "contrastive"
    temperature: float = 0.1
    legacy: ClassVar[dict[str, Any]] = {"objective": "regression"}
    """What checkpoints from before an option existed trained with (``engine.check_resume_settings``): sslbench's
    first DetCon_B regressed per mask, so resuming such a run as the contrastive default would switch its loss."""

    def __post_init__(self) -> None:
        DetConOptions.__post_init__(self)
        BYOLOptions.__post_init__(self)
        if self.objective not in DETCON_B_OBJECTIVES:
            raise ConfigError(f"option objective={self.objective!r} is not allowed; use one of {', '.join(DETCON_B_OBJECTIVES)}")
        if not self.temperature > 0:
            raise ConfigError(f"option temperature={self.temperature} is out of range; use a positive value, e.g. 0.1")


class DetConB(DetCon):
    name = "detcon_b"
    Options = DetConBOptions

    def build(self) -> None:
        o = self.options
        self.projection = MLPHead([self.pooled_channels, o.projection_hidden, o.projection_dim])
        self.prediction = MLPHead([o.projection_dim, o.prediction_hidden, o.projection_dim])
        self.target_encoder = frozen_copy(self.encoder)
        self.target_projection = frozen_copy(self.projection)
        self.views = self.make_views(byol_views(self.image_size, o.blur_p, o.solarize_p, o.crop_scale))

    def masked_training_loss(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        views, binary, ids, present1, present2 = self.views_and_segments(images, masks, generator)
        shape = (2, *ids.shape, -1)
        p1, p2 = self.prediction(self.projection(self.mask_vectors(self.encoder, views, binary))).view(shape)
        with torch.no_grad():
            t1, t2 = self.target_projection(self.mask_vectors(self.target_encoder, views, binary)).view(shape)
        valid = present1 & present2
        if self.options.objective == "contrastive":
            loss = detcon_loss(p1, p2, ids, present1, present2, self.options.temperature, targets=(t1, t2))
        else:
            loss = detcon_b_regression_loss(p1, p2, t1, t2, valid)
        return loss, {"masks_in_both_views": valid.float().mean(), "target_momentum": self.target_momentum()}

    def export_meta(self) -> dict[str, Any]:
        meta = super().export_meta()
        return {**meta, "objective": self.options.objective, "label": f"{self.name}[{meta['mask_source']},{self.options.objective}]"}

    # BYOL's momentum schedule and EMA update, on the same attribute names (target_encoder, target_projection).
    target_momentum = BYOL.target_momentum
    after_optimizer_step = BYOL.after_optimizer_step
    lr_scales = BYOL.lr_scales
