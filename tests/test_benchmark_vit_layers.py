"""benchmarks/vit_layers.py: the per-layer readouts replay the ViT's own forward pass."""

import torch
import torch.nn.functional as F

from sslbench.backbones import backbone_spec, build_encoder


@torch.no_grad()
def test_layer_readouts_match_the_encoder_forward(load_benchmark):
    vit_layers = load_benchmark("vit_layers")
    torch.manual_seed(0)
    encoder = build_encoder(backbone_spec("vit-nano", image_size=16), pretrained=False).eval()
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    features = vit_layers.layer_features(encoder, images, batch_size=2)
    depth = len(encoder.blocks)
    assert set(features) == {f"{kind} {i}" for kind in ("cls", "patches") for i in range(1, depth + 1)} | {"pooled"}
    assert all(value.shape == (5, encoder.dim) for value in features.values())
    tokens = encoder.forward_tokens(images.float() / 255)  # blocks then the final norm
    assert torch.allclose(encoder.norm(features[f"cls {depth}"]), tokens[:, 0], atol=1e-5)
    assert torch.allclose(features["pooled"], encoder(images.float() / 255).pooled)
    # The first block's patch readout: LayerNorm without parameters per token, then the mean over patches.
    hidden = encoder.blocks[0](torch.cat([(encoder.cls_token + encoder.position[:, :1]).expand(5, -1, -1),
                                          encoder.embed(images.float() / 255)], 1))
    assert torch.allclose(features["patches 1"], F.layer_norm(hidden[:, 1:], (encoder.dim,)).mean(1), atol=1e-6)
