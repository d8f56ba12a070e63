"""The DDPM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", appendix B), with named blocks.

The network predicts the noise ``eps`` in a noised image ``x_t`` given the integer timestep ``t``. The same
network serves EDM (Karras et al. 2022), which conditions it on the continuous ``c_noise = ln(sigma) / 4``
through the same sinusoidal embedding (their DDPM++ positional embedding) and reads its output as ``F``.
Layout (one "level" per resolution, ``L = len(channel_mults)``)::

    in                       3x3 conv, 3 -> base channels                       stride 1
    down{l}.{i}              ResBlock (+ self-attention at chosen strides)      stride 2**l
    down{l}.down             3x3 stride-2 conv (all levels but the last)        stride 2**(l+1)
    mid                      ResBlock, self-attention, ResBlock                 stride 2**(L-1)
    up{l}.{i}                concat(skip) -> ResBlock (+ attention), i <= num_res_blocks
    up{l}.up                 nearest x2 + 3x3 conv (all levels but the first)   stride 2**(l-1)
    out                      GroupNorm, SiLU, 3x3 conv -> 3 channels (eps)      stride 1
                             (without a top decoder block: of concat(up1.up, the deepest level-0 skip))

Decoder blocks carry the index ``l`` of the encoder level at the same resolution, so ``down2.1`` and
``up2.0`` both have stride 4. Every block has a stable name; ``forward_features`` runs the blocks in that
order and stops after the last requested one, which is how the DDAE readout (Xiang et al. 2023) reads
intermediate activations without hooks and without paying for the decoder when it reads the encoder.
DDAE's block ``out_k`` (the k-th decoder ResBlock) is our ``up{l}.{i}`` in the same order: with 2 blocks a
level, ``out_6`` (their CIFAR-10 DDPM readout) is ``up2.2``.

Speed: attention only where configured (fused ``F.scaled_dot_product_attention``, plain ops for bf16 on the
CPU, see ``attention``), one ``GroupNorm`` call per norm (its SiLU in place only outside autograd, which would copy
the map first), in-place additions where autograd allows, the time embedding (and its SiLU) computed once per
forward, nearest upsampling as a broadcast copy with a backward of contiguous sums (``upsample_nearest2x``:
PyTorch's CPU kernel is 4-5x slower), 1x1 convolutions as batched matrix products (``PointwiseConv``: oneDNN's NCHW
one is 2.7x slower), decoder blocks that meet their input with 1x1 convolutions only normalising and mixing the
upsampled part at its coarse resolution (``ResBlock.forward_upsampled``), and no dropout module when dropout is 0.
The code works in either memory format, but contiguous (NCHW) was the faster one in our measurements, on CPU and
on an H100 alike, because GroupNorm is slow in channels-last (on the CPU in bf16 its forward-backward took 5x as
long as in NCHW, more than the convolutions gain there). In unet-small-fast's fp32 training step on 2 AVX2 cores
the 3x3 convolutions took 46-56% of the time (``benchmarks/unet_step.py step --op-times``,
``benchmarks/results/speed.md`` section 11), so bf16 autocast is the remaining big lever where the CPU has bf16
instructions (about 1.7x there).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.backbones.base import spec_kwargs
from sslbench.errors import ConfigError


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a DDPM U-Net. ``attention_resolutions`` are strides (2 = 16x16 maps on 32x32 images)."""

    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (2,)
    dropout: float = 0.1
    groups: int = 32
    decoder_res_blocks: int | None = None
    """ResBlocks per decoder level; ``None`` is DDPM's ``num_res_blocks + 1``, one for each skip connection of the
    level (its encoder ResBlocks' outputs and the map that entered it). Fewer blocks read the deepest skips of their
    level and leave the rest unused: at 32x32 the decoder holds most of the U-Net's work, while DDAE reads features
    from the encoder, middle or early decoder blocks."""
    upsample_conv: bool = True
    """DDPM's 3x3 convolution after each nearest-neighbour upsampling; ``False`` upsamples only (the decoder ResBlock
    that follows convolves the map anyway). The convolution runs at the finer resolution with the coarser level's
    channels: 15% of unet-small's multiply-adds for the one at 32x32."""
    decoder_kernel: int = 3
    """Kernel size of the first convolution of every decoder ResBlock, the one that reads the concatenation of the
    decoder's map and an encoder skip: it holds most of a lean decoder's work (at 32x32 in unet-small-lean, 96 input
    channels). 1 mixes the two maps position by position at a ninth of the cost; the block's second convolution stays
    3x3, so each decoder block still sees its neighbourhood."""
    decoder_kernel2: int = 3
    """Kernel size of the second convolution of every decoder ResBlock. With ``decoder_kernel=1`` too, 1 makes the
    decoder position-wise: its spatial mixing is left to the encoder, the middle block and the output head."""
    upsample_project: bool = False
    """Before upsampling into a level with fewer channels, map the coarser map to that level's channels with a 1x1
    convolution at the coarser resolution, so the finer level concatenates (and normalises, and mixes) fewer channels
    at 4x the positions: in unet-small-lean, 64 instead of 96 at 32x32. Both this and ``decoder_kernel2=1`` on
    unet-small-fast (69.7M multiply-adds instead of 90.2M) trained at 2.67x the fp32 images/s of diffusers'
    UNet2DModel of the same channels on 2 CPU cores, but read out 32.23% against its 33.56% after 3 epochs of C10-mini
    (``benchmarks/ddae_vs_diffusers.py --unet small-pointwise``, ``benchmarks/results/speed.md`` section 10)."""
    top_decoder_block: bool = True
    """``False`` drops the decoder ResBlocks of the first (finest) level: the output head reads the upsampled map
    concatenated with that level's deepest encoder skip. The encoder, where DDAE reads its features, is unchanged."""
    patch_size: int = 1
    """Side of the pixel patches folded into channels before the first convolution (``pixel_unshuffle``) and unfolded
    from the output (``pixel_shuffle``). 2 runs every level at half the image's resolution, a quarter of the work,
    as "simple diffusion" (Hoogeboom et al. 2023) does to avoid full-resolution layers; block strides count image
    pixels, so they double too. At 32/64/64 channels on C10-mini it trained 4.7x faster than the full-resolution
    network but denoised and read out worse after 3 epochs (``benchmarks/results/speed.md`` section 8)."""
    init: str = "ddpm"
    """``ddpm``: the DDPM paper's initialisation (see ``UNet.reset_parameters``); ``pytorch``: each layer's framework
    default, as diffusers' ``UNet2DModel`` starts. On short CPU runs ``pytorch`` learns much faster: 3 epochs of
    unet-small on C10-mini end at DDPM loss 0.1202 against 0.2028 with ``ddpm``, and read out 35.68% against 29.46%
    (``benchmarks/ddae_vs_diffusers.py``, ``benchmarks/results/speed.md`` section 5). The presets keep ``ddpm`` so
    that checkpoints and published numbers reproduce."""

    def __post_init__(self):
        # A config read back from JSON/YAML holds lists; keep tuples so configs compare and hash.
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(int(s) for s in self.attention_resolutions))
        if (self.base_channels < 1 or self.num_res_blocks < 1 or self.patch_size < 1 or not self.channel_mults
                or min(self.channel_mults) < 1):
            raise ConfigError(f"UNetConfig {self} is invalid; base_channels, num_res_blocks, patch_size and every channel_mult must be >= 1")
        strides = [self.patch_size * 2**level for level in range(len(self.channel_mults))]
        if bad := [s for s in self.attention_resolutions if s not in strides]:
            raise ConfigError(f"UNet attention_resolutions {bad} are not level strides; use some of {strides}")
        channels = {self.base_channels * m for m in self.channel_mults}
        if bad := sorted(c for c in channels if c % self.groups):
            raise ConfigError(f"UNet groups={self.groups} does not divide channels {bad}; pick groups dividing every level's channels")
        if self.decoder_res_blocks is not None and not 1 <= self.decoder_res_blocks <= self.num_res_blocks + 1:
            raise ConfigError(f"UNet decoder_res_blocks={self.decoder_res_blocks} is out of range; use 1 to "
                              f"num_res_blocks + 1 = {self.num_res_blocks + 1}, or leave it unset (DDPM's)")
        for name in ("decoder_kernel", "decoder_kernel2"):
            if getattr(self, name) not in (1, 3):
                raise ConfigError(f"UNet {name}={getattr(self, name)} is not supported; use 3 (DDPM's) or 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"UNet dropout {self.dropout} is out of range; use a value in [0, 1)")
        if self.init not in ("ddpm", "pytorch"):
            raise ConfigError(f"UNet init={self.init!r} is not known; use ddpm or pytorch")


UNET_PRESETS: dict[str, UNetConfig] = {
    # CPU unit tests: 0.27M parameters, attention only in the middle block.
    "tiny": UNetConfig(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0, groups=8),
    # CPU benchmark (C10-mini): 1.1M parameters, 32/64/64 channels, attention at the lowest resolution only;
    # the layout and parameter count of diffusers' UNet2DModel(block_out_channels=(32, 64, 64), layers_per_block=1)
    # with (Attn)Down/UpBlock2D at the last level, the DDAE C10-mini reference. No dropout: a short CPU run underfits, and dropout costs ~20% of a bf16 step.
    "small": UNetConfig(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, groups=32),
    # "small" with a lean decoder at the same channels, 0.75M parameters: one ResBlock per decoder level, reading
    # the deepest skip, and no convolution after upsampling. 1.51x the bf16 training steps per second of "small" on
    # one CPU core (benchmarks/results/speed.md). A new preset, so it starts from PyTorch's layer defaults.
    "small-lean": UNetConfig(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0,
                             groups=32, decoder_res_blocks=1, upsample_conv=False, init="pytorch"),
    # "small-lean" whose decoder ResBlocks mix the concatenated skip with a 1x1 convolution (``decoder_kernel=1``),
    # 0.60M parameters, 90M multiply-adds per image against diffusers' 248M: 2.0-2.3x the fp32 training images/s of
    # diffusers' UNet2DModel of the same channels on 2 AVX2 cores, but after 3 epochs of C10-mini its readout was 1.4
    # points lower on the mean of seeds 0-3 (+0.1, -1.6, -0.4, -3.7; benchmarks/ddae_vs_diffusers.py --unet small-fast
    # --seed S, benchmarks/results/speed.md sections 10-11).
    "small-fast": UNetConfig(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0,
                             groups=32, decoder_res_blocks=1, upsample_conv=False, decoder_kernel=1, init="pytorch"),
    # The DDPM CIFAR-10 model, 35.7M parameters (Ho et al. 2020; the DDAE CIFAR-10 DDPM backbone).
    "ddpm_cifar10": UNetConfig(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(2,), dropout=0.1, groups=32),
}


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, as in the DDPM code): (B,) -> (B, dim).

    Integer DDPM steps and EDM's continuous noise conditioning both go through it."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=timesteps.device, dtype=torch.float32) * (-math.log(10000.0) / max(half - 1, 1)))
    angles = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, dim % 2))


def _silu(h: torch.Tensor) -> torch.Tensor:
    """SiLU of a map no one else reads, in place only where no autograd graph records it: SiLU's backward needs its
    input, so autograd copies the map before an in-place SiLU, one pass over it more than the out-of-place op."""
    return F.silu(h, inplace=not h.requires_grad)


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return _silu(norm(x))


def _concat_group_norm_affine(norm: nn.GroupNorm, parts: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-image, per-channel ``(scale, shift)`` (each (B, C_part, 1, 1)) with which ``norm`` maps the channel
    concatenation of ``parts``, where a part may be at a coarser resolution and stand for its nearest upsampling (it
    has the same per-channel moments). Every channel has as many positions, so a group's moments are the mean of its
    channels' moments, and groups may straddle two parts. The moments are means of ``x`` and ``x**2`` in at least
    float32 (as GroupNorm's statistics under autocast): ``torch.var_mean`` took 14.5-15.3 ms for the (128, 32, 32,
    32) fp32 skip of unet-small-fast's 32x32 decoder block on 2 AVX2 cores (torch 2.15; ``python
    benchmarks/unet_step.py step --model small-fast --precision fp32 --op-times``), more than GroupNorm's forward."""
    dtype = torch.promote_types(parts[0].dtype, torch.float32)
    parts_wide = [part.to(dtype) for part in parts]  # a no-op in float32
    mean = torch.cat([part.mean((2, 3)) for part in parts_wide], 1)
    square = torch.cat([part.square().mean((2, 3)) for part in parts_wide], 1)
    b, c = mean.shape
    group_mean = mean.view(b, norm.num_groups, -1).mean(2, keepdim=True)
    group_var = (square.view(b, norm.num_groups, -1).mean(2, keepdim=True) - group_mean.square()).clamp_min(0.0)
    scale = torch.rsqrt(group_var + norm.eps) * norm.weight.view(1, norm.num_groups, -1)
    shift = norm.bias.view(1, norm.num_groups, -1) - group_mean * scale
    sizes = [part.shape[1] for part in parts]
    return list(zip(scale.reshape(b, c, 1, 1).split(sizes, 1), shift.reshape(b, c, 1, 1).split(sizes, 1)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` (Vaswani et al. 2017) for single-head (B, N, d) queries, keys and values.

    PyTorch's fused kernel (``F.scaled_dot_product_attention``) is used except for bf16 on the CPU, where its
    flash kernel is the slow one: for the 8x8 maps of the small U-Net (B = 128, N = d = 64) it took 19 ms per
    forward-backward against 5 ms for the three plain ops, and 317 ms against 157 ms at N = d = 256 (torch 2.15,
    one core with avx512_bf16). The plain path takes the softmax in float32.
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        # The fused kernels want a head dimension: (B, 1, N, d).
        return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(1, 2)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype) @ v


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions, with a residual connection (DDPM's AttnBlock)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, HW, C): a free view when x is channels-last.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        return x + self.proj(attention(q, k, v)).transpose(1, 2).unflatten(2, (h, w))


def _as_nhwc(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` as a (B, H, W, C) view when it is stored channels-last (and not also contiguous), else as it is."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return (x.permute(0, 2, 3, 1), True) if channels_last else (x, False)


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1x1 convolution of ``x`` (B, C_in, H, W) by ``weight`` (C_out, C_in) as a matrix product, in ``x``'s memory
    format (see ``PointwiseConv``)."""
    v, nhwc = _as_nhwc(x)
    if nhwc:
        return F.linear(v, weight, bias).permute(0, 3, 1, 2)
    b, _, h, w = x.shape
    flat, weights = x.reshape(b, -1, h * w), weight.expand(b, -1, -1)
    out = torch.bmm(weights, flat) if bias is None else torch.baddbmm(bias.view(1, -1, 1).expand(b, -1, h * w), weights, flat)
    return out.view(b, -1, h, w)


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (the same parameters as ``nn.Conv2d(in, out, 1)``) computed as a matrix product.

    On the CPU oneDNN's 1x1 convolution of NCHW maps is slow, in the backward most: the 96 -> 32 one of
    unet-small-fast's 32x32 decoder block, on a (128, 96, 32, 32) fp32 map, took 52.7 ms forward and 164.6 ms
    forward and backward on 2 AVX2 cores, this product 11.3 and 61.9 ms (torch 2.15; ``python
    benchmarks/unet_step.py pointwise --steps 10``). Channels-last maps are a plain ``linear``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def matrix(self) -> torch.Tensor:
        """The weight as (out_channels, in_channels)."""
        return self.weight.view(self.out_channels, self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise(x, self.matrix(), self.bias)


def _conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """A stride-1 convolution that keeps the map's size: 3x3, or 1x1 as a matrix product."""
    return PointwiseConv(in_channels, out_channels) if kernel == 1 else nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-dropout-conv, + skip (1x1 if channels change).

    With ``attention`` a self-attention block follows (DDPM puts one after every ResBlock of an attention level).
    """

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, dropout: float, groups: int, attention: bool = False,
                 kernels: tuple[int, int] = (3, 3)):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = _conv(in_channels, out_channels, kernels[0])
        self.time_proj = nn.Linear(time_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv(out_channels, out_channels, kernels[1])
        self.skip = PointwiseConv(in_channels, out_channels) if in_channels != out_channels else nn.Identity()
        self.attention = SelfAttention(out_channels, groups) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, time_act: torch.Tensor) -> torch.Tensor:
        """``time_act`` is SiLU(time embedding), computed once per U-Net forward."""
        h = self.conv1(_norm_silu(self.norm1, x))
        h = h.add_(self.time_proj(time_act)[:, :, None, None])  # conv's backward does not need its output
        return self._second_half(h, self.skip(x))

    def _second_half(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.dropout(_norm_silu(self.norm2, h)))
        return self.attention(h.add_(skip))

    def reads_upsampled_exactly(self) -> bool:
        """Whether ``forward_upsampled`` applies: both maps the input meets first are position-wise (1x1 convolutions)."""
        return isinstance(self.conv1, PointwiseConv) and isinstance(self.skip, PointwiseConv)

    def forward_upsampled(self, coarse: torch.Tensor, skip: torch.Tensor, time_act: torch.Tensor) -> torch.Tensor:
        """``forward(cat([upsample_nearest2x(coarse), skip]), time_act)`` without making the upsampled concatenation.

        Nearest upsampling keeps every channel's mean and variance, and GroupNorm, SiLU and a 1x1 convolution act
        position by position, so the first half of the block commutes with the upsampling: the ``coarse`` channels
        are normalised and mixed at their own resolution (a quarter of the positions), and only the mixed map,
        with the block's output channels, is upsampled, into the sum with the ``skip`` channels' share. In
        unet-small-fast this skips the 96-channel 32x32 concatenation. The same function up to rounding (tested);
        needs ``reads_upsampled_exactly()``."""
        (scale_c, shift_c), (scale_s, shift_s) = _concat_group_norm_affine(self.norm1, [coarse, skip])
        mixed_c = _silu(torch.addcmul(shift_c, coarse, scale_c))
        mixed_s = _silu(torch.addcmul(shift_s, skip, scale_s))
        h = _pointwise_of_upsampled_concat(self.conv1, mixed_c, mixed_s)
        h = h.add_(self.time_proj(time_act)[:, :, None, None])
        return self._second_half(h, _pointwise_of_upsampled_concat(self.skip, coarse, skip))


class MiddleBlock(nn.Module):
    """ResBlock, self-attention, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, time_channels: int, dropout: float, groups: int):
        super().__init__()
        self.res1 = ResBlock(channels, channels, time_channels, dropout, groups, attention=True)
        self.res2 = ResBlock(channels, channels, time_channels, dropout, groups)

    def forward(self, x: torch.Tensor, time_act: torch.Tensor) -> torch.Tensor:
        return self.res2(self.res1(x, time_act), time_act)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """A (B, C, 2H, 2W) map as a 6-d view whose dimensions 2 and 4 (NCHW: (B, C, H, 2, W, 2)) or 1 and 3 (channels-last:
    (B, H, 2, W, 2, C)) step inside the 2x2 blocks; ``x`` must be contiguous in its memory format."""
    v, nhwc = _as_nhwc(x)
    if nhwc:
        b, h2, w2, c = v.shape
        return v.view(b, h2 // 2, 2, w2 // 2, 2, c)
    b, c, h2, w2 = v.shape
    return v.view(b, c, h2 // 2, 2, w2 // 2, 2)


def _spread(x: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) map as a 6-d view that broadcasts against ``_pairs`` of its 2x upsampling."""
    v, nhwc = _as_nhwc(x)
    return v[:, :, None, :, None, :] if nhwc else v[:, :, :, None, :, None]


def _sum_2x2_blocks(grad: torch.Tensor) -> torch.Tensor:
    """The backward of nearest 2x upsampling: each 2x2 block's sum, as two halvings of contiguous memory (autograd's
    own backward of a broadcast copy is a ``sum`` over two broadcast dimensions of a 6-d view)."""
    g, nhwc = _as_nhwc(grad)
    if nhwc:
        b, h2, w2, c = g.shape
        rows = g.reshape(b, h2 // 2, 2, w2 * c)
        rows = (rows[:, :, 0] + rows[:, :, 1]).view(b, h2 // 2, w2 // 2, 2, c)
        return (rows[:, :, :, 0] + rows[:, :, :, 1]).permute(0, 3, 1, 2)
    b, c, h2, w2 = g.shape
    rows = g.reshape(b, c, h2 // 2, 2, w2)
    rows = (rows[:, :, :, 0] + rows[:, :, :, 1]).view(b, c, h2 // 2, w2 // 2, 2)
    return rows[..., 0] + rows[..., 1]


class _UpsampleNearest2x(torch.autograd.Function):
    """2x nearest upsampling whose backward is ``_sum_2x2_blocks``: with autograd's backward the copy of a (128, 64,
    16, 16) map took 79-92 ms forward and backward on 2 AVX2 cores, with this one 33.5 ms, about its forward alone
    (torch 2.15; ``python benchmarks/unet_step.py upsample --steps 10``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        layout = torch.channels_last if _as_nhwc(x)[1] else torch.contiguous_format
        out = torch.empty((b, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=layout)
        _pairs(out).copy_(_spread(x))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _sum_2x2_blocks(grad)


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")`` as a broadcast copy, in ``x``'s memory format.

    The same values and gradients, and on the CPU several times faster: PyTorch's CPU nearest-upsampling kernel took
    139-171 ms for a (128, 64, 16, 16) fp32 map on 2 cores, this copy 31-33 ms, and 146-154 ms against 33.5 ms with
    the backward (torch 2.15, AVX2 EPYC; ``python benchmarks/unet_step.py upsample --steps 10``, two runs)."""
    return _UpsampleNearest2x.apply(x)


class _AddUpsampled(torch.autograd.Function):
    """``fine + upsample_nearest2x(coarse)`` in one pass, without making the upsampled map."""

    @staticmethod
    def forward(ctx, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(fine)
        torch.add(_pairs(fine), _spread(coarse), out=_pairs(out))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, _sum_2x2_blocks(grad)


def add_upsampled(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``fine + upsample_nearest2x(coarse)`` for a (B, C, 2H, 2W) map and a (B, C, H, W) one in the same memory format,
    the sum made in one pass over ``fine``."""
    nhwc = _as_nhwc(fine)[1]
    if nhwc != _as_nhwc(coarse)[1] or not fine.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format):
        return fine + upsample_nearest2x(coarse)
    return _AddUpsampled.apply(fine, coarse)


def _pointwise_of_upsampled_concat(conv: PointwiseConv, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """``conv(cat([upsample_nearest2x(coarse), fine]))``: the coarse channels' share is mixed before it is upsampled."""
    weight, cut = conv.matrix(), coarse.shape[1]
    return add_upsampled(pointwise(fine, weight[:, cut:], conv.bias), pointwise(coarse, weight[:, :cut]))


class Upsample(nn.Module):
    """Optionally a 1x1 projection to ``out_channels`` (at the coarse resolution), 2x nearest upsampling, optionally
    a 3x3 convolution."""

    def __init__(self, channels: int, conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.project = PointwiseConv(channels, out_channels) if out_channels != channels else nn.Identity()
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1) if conv else nn.Identity()

    def is_plain(self) -> bool:
        """Whether it only upsamples (no projection, no convolution)."""
        return isinstance(self.project, nn.Identity) and isinstance(self.conv, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest2x(self.project(x)))


class OutputHead(nn.Module):
    def __init__(self, channels: int, groups: int, out_channels: int = 3):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_norm_silu(self.norm, x))


# How a block is called inside the forward loop.
_IN, _DOWN_RES, _DOWN, _MID, _UP_RES, _UP, _OUT = range(7)


@dataclass(frozen=True)
class _Step:
    name: str
    role: int
    stride: int
    channels: int
    skip: int | None = None
    """For a decoder ResBlock (or the output head, without a top decoder block): the index of the encoder output it
    concatenates (in the order they were made)."""


def _upsampled_by_next(upsample: nn.Module, following: list[tuple[_Step, nn.Module]]) -> bool:
    """Whether the decoder ResBlock after ``upsample`` can take the map before it and its own skip separately
    (``ResBlock.forward_upsampled``): a plain upsampling followed by a ResBlock that concatenates a skip and meets
    its input with 1x1 convolutions only."""
    return (bool(following) and following[0][0].skip is not None and isinstance(upsample, Upsample) and upsample.is_plain()
            and isinstance(following[0][1], ResBlock) and following[0][1].reads_upsampled_exactly())


class UNet(nn.Module):
    """The DDPM epsilon-prediction U-Net with named blocks (see the module docstring for the names).

    ``forward(x, t)`` maps noised images in [-1, 1] (B, 3, H, W) and timesteps (B,) (integers, or EDM's
    continuous conditioning) to the predicted noise (B, 3, H, W); H and W must be divisible by
    ``patch_size * 2 ** (len(channel_mults) - 1)``.
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()
        base, groups, dropout, patch = config.base_channels, config.groups, config.dropout, config.patch_size
        time_channels = 4 * base
        levels = len(config.channel_mults)
        self.time_mlp = nn.Sequential(nn.Linear(base, time_channels), nn.SiLU(), nn.Linear(time_channels, time_channels))
        self.conv_in = nn.Conv2d(3 * patch**2, base, 3, padding=1)

        steps = [_Step("in", _IN, patch, base)]
        skip_channels = [base]
        channels = base
        self.encoder = nn.ModuleList()
        for level, mult in enumerate(config.channel_mults):
            stride, out_channels = patch * 2**level, base * mult
            blocks = nn.ModuleDict()
            for i in range(config.num_res_blocks):
                blocks[str(i)] = ResBlock(channels, out_channels, time_channels, dropout, groups, stride in config.attention_resolutions)
                channels = out_channels
                steps.append(_Step(f"down{level}.{i}", _DOWN_RES, stride, channels))
                skip_channels.append(channels)
            if level < levels - 1:
                blocks["down"] = Downsample(channels)
                steps.append(_Step(f"down{level}.down", _DOWN, 2 * stride, channels))
                skip_channels.append(channels)
            self.encoder.append(blocks)

        self.mid = MiddleBlock(channels, time_channels, dropout, groups)
        steps.append(_Step("mid", _MID, patch * 2 ** (levels - 1), channels))

        decoder = {}
        per_level = config.num_res_blocks + 1  # skip connections per level
        decoder_blocks = config.decoder_res_blocks or per_level
        for level in reversed(range(levels)):
            stride, out_channels = patch * 2**level, base * config.channel_mults[level]
            # The encoder made per_level maps at this level's resolution; its decoder ResBlocks read the deepest first.
            level_skips = range(per_level * (level + 1) - 1, per_level * level - 1, -1)
            blocks = nn.ModuleDict()
            for i, skip in enumerate(level_skips[:decoder_blocks if level or config.top_decoder_block else 0]):
                in_channels = channels + skip_channels[skip]
                blocks[str(i)] = ResBlock(in_channels, out_channels, time_channels, dropout, groups, stride in config.attention_resolutions,
                                          (config.decoder_kernel, config.decoder_kernel2))
                channels = out_channels
                steps.append(_Step(f"up{level}.{i}", _UP_RES, stride, channels, skip))
            if level > 0:
                finer = base * config.channel_mults[level - 1] if config.upsample_project else channels
                blocks["up"] = Upsample(channels, config.upsample_conv, finer)
                channels = finer
                steps.append(_Step(f"up{level}.up", _UP, stride // 2, channels))
            decoder[level] = blocks
        # decoder[l] works at the resolution of encoder[l], so parameter names line up with block names.
        self.decoder = nn.ModuleList(decoder[level] for level in range(levels))
        out_skip = None if config.top_decoder_block else per_level - 1  # the first level's deepest skip
        self.out = OutputHead(channels + (0 if out_skip is None else skip_channels[out_skip]), groups, 3 * patch**2)
        steps.append(_Step("out", _OUT, 1, 3, out_skip))

        self._steps = steps
        self._index = {step.name: i for i, step in enumerate(steps)}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DDPM initialisation: Xavier-uniform weights, zero biases, and zero for the last layer of every
        residual branch and for the output conv, so each block starts as the identity and the
        untrained network predicts eps = 0 (its loss is then E[eps^2] = 1). ``config.init == "pytorch"``: every
        layer's own default initialisation instead."""
        if self.config.init == "pytorch":
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm)):
                    m.reset_parameters()
            return
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, SelfAttention):
                nn.init.zeros_(m.proj.weight)
        nn.init.zeros_(self.out.conv.weight)

    def block_names(self) -> list[str]:
        """All block names in forward order."""
        return [step.name for step in self._steps]

    def block_stride(self, name: str) -> int:
        return self._steps[self._block_index(name)].stride

    def block_channels(self, name: str) -> int:
        return self._steps[self._block_index(name)].channels

    def _block_index(self, name: str) -> int:
        if name not in self._index:
            raise ConfigError(f"unknown U-Net block {name!r}; use one of {self.block_names()}")
        return self._index[name]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predicted noise (EDM: the raw output ``F``) for noised images ``x`` (B, 3, H, W) at timesteps ``t`` (B,)."""
        return self._run(x, t, {"out"}, len(self._steps) - 1)["out"]

    def forward_features(self, x: torch.Tensor, t: torch.Tensor, blocks: list[str]) -> dict[str, torch.Tensor]:
        """Outputs of the named blocks, running the network only up to the last of them."""
        if not blocks:
            raise ConfigError(f"forward_features needs at least one block name; use some of {self.block_names()}")
        last = max(self._block_index(name) for name in blocks)
        outputs = self._run(x, t, set(blocks), last)
        return {name: outputs[name] for name in blocks}

    def _blocks_in_order(self) -> list[nn.Module]:
        """The block modules in forward order, read from the registered children (so copies, device moves
        and wrappers that replace submodules are always seen)."""
        blocks = [self.conv_in]
        for level in self.encoder:
            blocks.extend(level.values())
        blocks.append(self.mid)
        for level in reversed(self.decoder):
            blocks.extend(level.values())
        blocks.append(self.out)
        return blocks

    def _run(self, x: torch.Tensor, t: torch.Tensor, wanted: set[str], last: int) -> dict[str, torch.Tensor]:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        embedding = timestep_embedding(t, self.config.base_channels).to(self.conv_in.weight.dtype)
        time_act = F.silu(self.time_mlp(embedding))
        skips: list[torch.Tensor] = []
        outputs: dict[str, torch.Tensor] = {}
        patch = self.config.patch_size
        h = F.pixel_unshuffle(x, patch) if patch > 1 else x
        pairs = list(zip(self._steps[: last + 1], self._blocks_in_order()))
        coarse = None  # the map before an upsampling that the next decoder ResBlock makes itself
        for index, (step, module) in enumerate(pairs):
            role = step.role
            if role == _UP and step.name not in wanted and _upsampled_by_next(module, pairs[index + 1:index + 2]):
                coarse = h
                continue
            if coarse is not None:
                h, coarse = module.forward_upsampled(coarse, skips[step.skip], time_act), None
            else:
                if step.skip is not None:
                    h = torch.cat([h, skips[step.skip]], dim=1)
                if role == _OUT and patch > 1:
                    h = F.pixel_shuffle(module(h), patch)
                elif role in (_DOWN_RES, _MID, _UP_RES):
                    h = module(h, time_act)
                else:
                    h = module(h)
            if role in (_IN, _DOWN_RES, _DOWN):
                skips.append(h)
            if step.name in wanted:
                outputs[step.name] = h
        return outputs


def unet_config_dict(config: UNetConfig) -> dict:
    """The JSON-able form of a config (tuples as lists), as stored in encoder specs."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(config).items()}


def unet_config_from_dict(values: dict) -> UNetConfig:
    """The config a spec's ``unet`` entry describes (the inverse of ``unet_config_dict``); a key ``UNetConfig`` does not
    take, or a stale one, is a ConfigError that names it."""
    return UNetConfig(**spec_kwargs(UNetConfig, values, "diffusion U-Net", supplied=()))
