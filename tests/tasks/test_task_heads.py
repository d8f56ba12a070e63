import pytest
import torch

from sslbench.backbones.base import Features, count_parameters
from sslbench.errors import ConfigError
from sslbench.tasks.heads import (
    ASPP,
    CountingConvHead,
    DeepLabV3Plus,
    LinearHead,
    UNetDecoder,
    aspp_rates,
    counting_conv_task_head,
    deeplab_task_head,
    linear_task_head,
    unet_task_head,
    usable_strides,
)

STRIDE_SETS = [
    ({1: 8, 2: 16, 4: 32, 8: 64}, (32, 32)),  # ResNet, CIFAR stem
    ({4: 8, 8: 16, 16: 32, 32: 64}, (64, 64)),  # ResNet, ImageNet stem: a 2x2 stride-32 map
    ({4: 24}, (32, 32)),  # ViT: one stride-4 map
    ({1: 4, 2: 4, 4: 4, 8: 4, 16: 4}, (64, 48)),  # diffusion U-Net levels, non-square image
    ({16: 6}, (30, 30)),  # image size not divisible by the stride
]


def _maps(map_channels, image_size, batch=2):
    height, width = image_size
    return {s: torch.randn(batch, c, -(-height // s), -(-width // s)) for s, c in map_channels.items()}


@pytest.mark.parametrize(("map_channels", "image_size"), STRIDE_SETS)
def test_unet_decoder_output_shape(map_channels, image_size):
    decoder = UNetDecoder(map_channels, out_channels=1, width=8)
    assert decoder(_maps(map_channels, image_size), image_size).shape == (2, 1, *image_size)
    # One skip block per shallower map, none for the deepest.
    assert sorted(int(s) for s in decoder.blocks) == sorted(map_channels)[:-1]


@pytest.mark.parametrize(("map_channels", "image_size"), STRIDE_SETS)
def test_deeplab_output_shape_and_maps_read(map_channels, image_size):
    decoder = DeepLabV3Plus(map_channels, out_channels=5, deepest_side=-(-min(image_size) // max(map_channels)), width=16)
    assert decoder(_maps(map_channels, image_size), image_size).shape == (2, 5, *image_size)
    assert decoder.deepest == max(map_channels)
    assert decoder.low_level == (4 if 4 in map_channels else min(map_channels))


def test_dense_heads_read_only_their_maps():
    channels = {1: 8, 2: 16, 4: 32, 8: 64}
    assert unet_task_head(channels, 1, width=8, finest_stride=2).strides == (2, 4, 8)
    assert deeplab_task_head(channels, 3, width=8, finest_stride=1, image_size=(32, 32)).strides == (4, 8)
    # No map as coarse as finest_stride: the coarsest one is used.
    assert unet_task_head({1: 8, 2: 8}, 1, width=8, finest_stride=4).strides == (2,)
    head = deeplab_task_head({4: 8, 8: 8}, 3, width=8, finest_stride=1, image_size=(32, 32))
    assert head(Features(pooled=None, maps=_maps({4: 8, 8: 8}, (32, 32))), (32, 32)).shape == (2, 3, 32, 32)


def test_aspp_rates_scale_with_the_map_side():
    assert aspp_rates(33) == (6, 12, 18)  # DeepLabV3's own setting
    assert aspp_rates(16) == (3, 6, 9)  # 6*16/33 = 2.9, 5.8, 8.7
    assert aspp_rates(8) == (1, 3, 4)  # 1.45, 2.9, 4.4
    assert aspp_rates(4) == (1, 1, 2)  # 0.73, 1.45, 2.2
    assert aspp_rates(3) == (1, 1, 2)  # 0.55, 1.1, 1.6
    assert aspp_rates(64) == (12, 23, 35)  # 11.6, 23.3, 34.9
    for side in (1, 2):
        assert aspp_rates(side) == (1, 1, 1)
    for side in range(2, 100):
        # Every dilated filter still reaches pixels of the map (a rate >= side would only see padding).
        assert max(aspp_rates(side)) < side
    with pytest.raises(ConfigError, match="side"):
        aspp_rates(0)


@pytest.mark.parametrize("side", [1, 2, 4])
def test_aspp_on_tiny_maps(side):
    aspp = ASPP(6, 8, aspp_rates(side)).train()
    out = aspp(torch.randn(3, 6, side, side))
    assert out.shape == (3, 8, side, side) and torch.isfinite(out).all()
    dilations = [branch[0].dilation[0] for branch in aspp.branches[1:]]
    assert tuple(dilations) == aspp_rates(side)
    # 1x1 branch + 3 dilated branches + image pooling, projected back to 8 channels.
    assert aspp.project[0].in_channels == 5 * 8


def test_aspp_dilated_branch_reaches_rate_pixels_away():
    # On a 4x4 map the rate-2 branch must see a pixel 2 columns away (it does not degenerate to 1x1).
    conv = ASPP(1, 2, aspp_rates(4)).branches[3][0]
    assert conv.dilation == (2, 2)
    x = torch.zeros(1, 1, 4, 4)
    moved = x.clone()
    moved[0, 0, 1, 3] = 5.0
    assert (conv(moved)[0, :, 1, 1] != conv(x)[0, :, 1, 1]).all()


def test_counting_conv_head_reads_the_deepest_map():
    channels = {1: 8, 2: 16, 4: 32}
    head = counting_conv_task_head(channels, num_classes=6, width=8)
    assert head.strides == (4,)
    features = Features(pooled=None, maps={4: torch.randn(3, 32, 4, 4)})
    assert head(features, (16, 16)).shape == (3, 6)
    assert CountingConvHead(32, 6, width=8)(torch.randn(3, 32, 1, 1)).shape == (3, 6)


def test_linear_head_shape_and_hand_counted_parameters():
    assert LinearHead(12, 7)(torch.randn(4, 12)).shape == (4, 7)
    head = linear_task_head(12, 7)
    assert head.strides == ()
    assert head(Features(pooled=torch.randn(4, 12), maps={}), (1, 1)).shape == (4, 7)
    assert count_parameters(head.module, trainable_only=True) == 12 * 7 + 7  # the BatchNorm is not affine


def test_heads_need_maps():
    with pytest.raises(ConfigError, match="no feature maps"):
        usable_strides({}, 1)
    with pytest.raises(ConfigError, match="no feature maps"):
        counting_conv_task_head({}, 3, 8)
    with pytest.raises(ConfigError, match="at least one feature map"):
        UNetDecoder({}, out_channels=1)
