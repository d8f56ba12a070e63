import pytest
import torch

from sslbench.tasks.heads import DenseDecoder, LinearHead


@pytest.mark.parametrize(
    ("map_channels", "image_size"),
    [
        ({1: 8, 2: 16, 4: 32, 8: 64}, (32, 32)),  # CIFAR ResNet
        ({16: 24}, (32, 32)),  # ViT: one stride-16 map
        ({4: 8}, (32, 32)),
        ({2: 4, 4: 4, 8: 4, 16: 4, 32: 4}, (64, 48)),  # U-Net levels, non-square image
        ({16: 6}, (30, 30)),  # image size not divisible by the stride
    ],
)
def test_dense_decoder_output_shape(map_channels, image_size):
    height, width = image_size
    maps = {s: torch.randn(2, c, -(-height // s), -(-width // s)) for s, c in map_channels.items()}
    decoder = DenseDecoder(map_channels, out_channels=5, width=8)
    assert decoder(maps, image_size).shape == (2, 5, height, width)


def test_dense_decoder_needs_maps():
    with pytest.raises(ValueError, match="at least one feature map"):
        DenseDecoder({}, out_channels=2)


def test_linear_head_shape():
    assert LinearHead(12, 7)(torch.randn(4, 12)).shape == (4, 7)
