import pytest
import torch
import torchvision.transforms.v2.functional as TF

from torch.utils._python_dispatch import TorchDispatchMode

from sslbench.augment import (ViewConfig, ViewMaker, _color_op, augment, augment_with_masks, color_jitter, host_to_device,
                              jitter_plan, sample_crop_boxes, step_generator)
from sslbench.errors import ConfigError


def _images(n=64, size=32, seed=0):
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def test_view_shape_range_and_determinism():
    images = _images()
    config = ViewConfig(size=24, blur_p=0.5, solarize_p=0.2, cutout_p=0.3, noise_p=0.3, sobel_p=0.1, rotation_p=0.5, rotation_degrees=30)
    a = augment(images, config, torch.Generator().manual_seed(1))
    b = augment(images, config, torch.Generator().manual_seed(1))
    c = augment(images, config, torch.Generator().manual_seed(2))
    assert a.shape == (64, 3, 24, 24) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_box_scale_distribution_matches_torchvision():
    """The batched sampler and torchvision's RandomResizedCrop draw the same distribution of areas."""
    from torchvision.transforms import RandomResizedCrop

    n = 4000
    boxes = sample_crop_boxes(n, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    ours = (boxes[:, 2] * boxes[:, 3] / 1024).sort().values
    torch.manual_seed(0)
    ref = torch.tensor([h * w / 1024 for _, _, h, w in (RandomResizedCrop.get_params(torch.zeros(3, 32, 32), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n))]).sort().values
    assert abs(ours.mean() - ref.mean()) < 0.02
    assert (ours - ref).abs().max() < 0.08  # quantile-quantile distance (two-sample KS-like bound)
    assert ((boxes[:, 0] + boxes[:, 2]) <= 32).all() and ((boxes[:, 1] + boxes[:, 3]) <= 32).all()


def test_full_crop_without_flip_is_identity():
    images = _images(4)
    config = ViewConfig(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    out = augment(images, config, torch.Generator().manual_seed(0))
    assert torch.allclose(out, images.float() / 255, atol=1e-5)


def test_flip_mirrors_the_image():
    images = _images(4)
    config = ViewConfig(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=1.0, jitter_p=0.0, grayscale_p=0.0)
    out = augment(images, config, torch.Generator().manual_seed(0))
    assert torch.allclose(out, images.float().flip(3) / 255, atol=1e-5)


@pytest.mark.parametrize("op,factor", [(0, 1.4), (1, 0.6), (2, 1.7), (3, 0.15)])
def test_colour_ops_match_torchvision(op, factor):
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(op))
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(6, 1)
    factors[:, op] = factor
    order = torch.arange(4).repeat(6, 1)
    ours = color_jitter(x, factors, *jitter_plan(order))
    ref_fn = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][op]
    ref = torch.stack([ref_fn(img, factor) for img in x])
    assert torch.allclose(ours, ref, atol=2e-3)


def test_colour_jitter_applies_each_images_ops_in_its_own_order():
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(9, 3, 6, 6, generator=generator)
    factors = torch.stack([torch.rand(9, generator=generator) + 0.5 for _ in range(3)] + [torch.rand(9, generator=generator) - 0.5], 1)
    order = torch.argsort(torch.rand(9, 4, generator=generator), dim=1)
    order[0] = order[1] = torch.tensor([3, 2, 1, 0])  # two images share an order; other stages leave some op unused
    ours = color_jitter(x, factors, *jitter_plan(order))
    for i in range(9):
        ref = x[i:i + 1]
        for op in order[i].tolist():
            ref = _color_op(ref, op, factors[i:i + 1, op])
        assert torch.allclose(ours[i:i + 1], ref, atol=1e-6)


class _Copies(TorchDispatchMode):
    """The host-to-device copies an augmentation makes, and whether each is non-blocking."""

    def __init__(self):
        super().__init__()
        self.non_blocking: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].device != kwargs.get("device", args[0].device):
            self.non_blocking.append(bool(kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def test_the_device_side_of_augmentation_reads_nothing_back_and_gets_its_parameters_in_one_copy():
    # On the meta device tensors have no data: reading any back (nonzero, item, a boolean test) fails. On a GPU each
    # such read, and each blocking host-to-device copy, makes the host wait for the device's queue to drain.
    images = _images(16).to("meta")
    config = ViewConfig(blur_p=0.5, solarize_p=0.2, cutout_p=0.3, sobel_p=0.1, rotation_p=0.5, rotation_degrees=10)
    with _Copies() as copies:
        views, masks = augment_with_masks(images, torch.zeros(16, 32, 32, dtype=torch.long, device="meta"), config,
                                          torch.Generator().manual_seed(0))
    assert views.shape == (16, 3, 32, 32) and views.device.type == "meta" and masks.shape == (16, 32, 32)
    assert copies.non_blocking == [True]


def test_host_draws_go_to_the_device_without_blocking_and_device_tensors_come_back_blocking():
    with _Copies() as copies:
        on_device = host_to_device(torch.arange(4), "meta")
        assert host_to_device(on_device, "meta") is on_device  # already there: no copy
    assert on_device.device.type == "meta" and copies.non_blocking == [True]
    with _Copies() as copies, pytest.raises(NotImplementedError):  # meta tensors cannot land on the host; the copy's flag is seen first
        host_to_device(on_device, "cpu")
    assert copies.non_blocking == [False]


def test_grayscale_probability_and_colour_statistics():
    images = _images(2000, 8)
    config = ViewConfig(size=8, jitter_p=0.0, grayscale_p=0.2)
    out = augment(images, config, torch.Generator().manual_seed(0))
    is_gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert abs(is_gray.float().mean().item() - 0.2) < 0.03


def test_bad_view_option_is_named():
    with pytest.raises(ConfigError, match="grayscale_p"):
        ViewMaker([ViewConfig(grayscale_p=1.5)])


def test_step_generator_depends_only_on_seed_and_step():
    a = torch.rand(3, generator=step_generator(0, 5))
    assert torch.equal(a, torch.rand(3, generator=step_generator(0, 5)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(0, 6)))


def _id_coded_blocks(n=4, size=32, block=8):
    """Images of 4x4 blocks of 8 px whose colour encodes the block's id, and those ids as masks.

    The colours lie on the moment curve (i, i^2, i^3): no palette colour is a blend of others, so a
    view pixel showing exactly a palette colour was sampled inside that block.
    """
    ids = torch.arange(16).view(4, 4).repeat_interleave(block, 0).repeat_interleave(block, 1)
    masks = torch.stack([torch.roll(ids, shifts=(3 * i, 5 * i), dims=(0, 1)) for i in range(n)]).to(torch.uint8)
    steps = torch.arange(16, dtype=torch.float64)
    palette = torch.stack([steps * 17, steps**2 * 255 / 225, steps**3 * 255 / 3375], 1).round().to(torch.uint8)
    images = palette[masks.long()].permute(0, 3, 1, 2).contiguous()
    return images, masks, palette.float() / 255


def test_warped_masks_stay_aligned_with_the_view_pixels():
    images, masks, palette = _id_coded_blocks()
    config = ViewConfig(size=24, crop_scale=(0.3, 1.0), jitter_p=0.0, grayscale_p=0.0, hflip_p=0.5,
                        rotation_p=1.0, rotation_degrees=30)
    views, warped = augment_with_masks(images, masks, config, torch.Generator().manual_seed(3))
    assert warped.shape == (4, 24, 24) and warped.dtype == torch.uint8
    # The view pixels are exactly augment's (the mask does not change the random draws).
    assert torch.equal(views, augment(images, config, torch.Generator().manual_seed(3)))
    distance = (views.permute(0, 2, 3, 1).unsqueeze(3) - palette).abs().amax(-1)  # (B, S, S, 16)
    closest = distance.min(-1)
    pure = closest.values < 1e-4  # pixels inside a block, away from its edges
    assert pure.float().mean() > 0.5
    assert torch.equal(warped[pure].long(), closest.indices[pure])
    # A mask warped with other crop parameters disagrees with the view: the check above has teeth.
    _, other = augment_with_masks(images, masks, config, torch.Generator().manual_seed(4))
    assert (other[pure].long() != closest.indices[pure]).float().mean() > 0.3


def test_view_maker_returns_each_views_mask():
    images, masks, _ = _id_coded_blocks(n=2)
    maker = ViewMaker([ViewConfig(size=16, jitter_p=0.0, grayscale_p=0.0), ViewConfig(size=16, jitter_p=0.0, grayscale_p=0.0)])
    views, warped = maker.with_masks(images, masks, torch.Generator().manual_seed(0))
    plain = maker(images, torch.Generator().manual_seed(0))
    assert len(views) == len(warped) == 2
    assert all(torch.equal(a, b) for a, b in zip(views, plain))
    assert all(m.shape == (2, 16, 16) for m in warped)
