"""DaViT (Dual Attention Vision Transformer) image encoder, in plain PyTorch.

An equivalent of ``davit_v1.py`` of the ``medimageinsights`` 0.1.1 package (Microsoft's
MedImageInsight image encoder, standard parametrisation), without its dependencies
(einops, timm, mup, mpi4py). Inference only: no dropout or drop-path, no activation
checkpointing. Module names are the published ones, so the published state dict
(``image_encoder.`` prefix removed) loads with ``strict=True``:

``convs.{s}.proj``, ``convs.{s}.norm``,
``blocks.{s}.{b}.spatial_block.{conv1.fn.dw, window_attn.norm, window_attn.fn.qkv,
window_attn.fn.proj, conv2.fn.dw, ffn.norm, ffn.fn.net.fc1, ffn.fn.net.fc2}``,
the same under ``channel_block`` with ``channel_attn``, and ``norms``.

Computation, as published:

- stage ``s``: a strided convolution embeds patches (``ConvEmbed``: LayerNorm after the
  convolution in stage 0, before it in the later stages when ``patch_prenorm``), then
  ``depths[s]`` pairs of a spatial block and a channel block;
- spatial block: depth-wise 3x3 conv (residual), LayerNorm + window self-attention
  over ``window_size`` squares (the token grid zero-padded to a multiple of the window,
  padded tokens attended to, as published; residual), depth-wise conv (residual),
  LayerNorm + MLP (GELU, ratio 4; residual);
- channel block: the same with channel-group attention, where each group's
  ``group_dim x group_dim`` attention is scaled by ``N ** -0.5`` (N = tokens);
- after the last stage: mean over tokens, then LayerNorm: a ``embed_dims[-1]`` vector.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (fused
kernels on GPU); ``use_sdpa=False`` runs the published explicit matmul-softmax form
(the tests check both agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DaViT"]

Size = tuple[int, int]


class _PreNorm(nn.Module):
    """Residual wrapper: ``x + fn(norm(x))`` (``norm`` may be None)."""

    def __init__(self, norm: nn.Module | None, fn: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.fn = fn

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        y, size = self.fn(self.norm(x) if self.norm is not None else x, size)
        return x + y, size


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential()
        self.net.add_module("fc1", nn.Linear(dim, hidden))
        self.net.add_module("act", nn.GELU())
        self.net.add_module("fc2", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        return self.net(x), size


class _DepthWiseConv2d(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel_size=3, padding=1, stride=1, groups=dim, bias=True)

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        b, _, c = x.shape
        h, w = size
        y = self.dw(x.transpose(1, 2).reshape(b, c, h, w))
        return y.flatten(2).transpose(1, 2), (y.shape[-2], y.shape[-1])


class _ConvEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, stride: int, padding: int, pre_norm: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(in_chans if pre_norm else embed_dim)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        if x.dim() == 3:
            h, w = size
            if self.pre_norm:
                x = self.norm(x)
            b, _, c = x.shape
            x = x.transpose(1, 2).reshape(b, c, h, w)
        x = self.proj(x)
        h, w = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        if not self.pre_norm:
            x = self.norm(x)
        return x, (h, w)


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, use_sdpa: bool) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = float(dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.use_sdpa = use_sdpa

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        h, w = size
        b, _, c = x.shape
        ws = self.window_size
        x = x.view(b, h, w, c)
        pad_r = (ws - w % ws) % ws
        pad_b = (ws - h % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        # window partition -> (b * windows, ws * ws, c)
        x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        bw, nw, _ = x.shape
        qkv = self.qkv(x).reshape(bw, nw, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            y = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        y = self.proj(y.transpose(1, 2).reshape(bw, nw, c))
        # window reverse
        y = y.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if pad_r or pad_b:
            y = y[:, :h, :w, :]
        return y.reshape(b, h * w, c), size


class _ChannelAttention(nn.Module):
    def __init__(self, dim: int, groups: int, use_sdpa: bool) -> None:
        super().__init__()
        self.dim = dim
        self.groups = groups
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.use_sdpa = use_sdpa

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.groups, c // self.groups).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (b, groups, n, group_dim)
        scale = float(n) ** -0.5
        if self.use_sdpa:
            # attention between channels: sequences of group_dim "tokens" of n features
            y = F.scaled_dot_product_attention(
                q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), scale=scale
            ).transpose(-1, -2)
        else:
            attn = ((q * scale).transpose(-1, -2) @ k).softmax(dim=-1)
            y = (attn @ v.transpose(-1, -2)).transpose(-1, -2)
        y = y.transpose(1, 2).reshape(b, n, c)
        return self.proj(y), size


class _SpatialBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, use_sdpa: bool) -> None:
        super().__init__()
        self.conv1 = _PreNorm(None, _DepthWiseConv2d(dim))
        self.window_attn = _PreNorm(nn.LayerNorm(dim), _WindowAttention(dim, num_heads, window_size, use_sdpa))
        self.conv2 = _PreNorm(None, _DepthWiseConv2d(dim))
        self.ffn = _PreNorm(nn.LayerNorm(dim), _Mlp(dim, int(dim * mlp_ratio)))

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        x, size = self.conv1(x, size)
        x, size = self.window_attn(x, size)
        x, size = self.conv2(x, size)
        return self.ffn(x, size)


class _ChannelBlock(nn.Module):
    def __init__(self, dim: int, groups: int, mlp_ratio: float, use_sdpa: bool) -> None:
        super().__init__()
        self.conv1 = _PreNorm(None, _DepthWiseConv2d(dim))
        self.channel_attn = _PreNorm(nn.LayerNorm(dim), _ChannelAttention(dim, groups, use_sdpa))
        self.conv2 = _PreNorm(None, _DepthWiseConv2d(dim))
        self.ffn = _PreNorm(nn.LayerNorm(dim), _Mlp(dim, int(dim * mlp_ratio)))

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        x, size = self.conv1(x, size)
        x, size = self.channel_attn(x, size)
        x, size = self.conv2(x, size)
        return self.ffn(x, size)


class _DualBlock(nn.Module):
    def __init__(self, spatial: _SpatialBlock, channel: _ChannelBlock) -> None:
        super().__init__()
        self.spatial_block = spatial
        self.channel_block = channel

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        x, size = self.spatial_block(x, size)
        return self.channel_block(x, size)


class _Stage(nn.ModuleList):
    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:  # type: ignore[override]
        for block in self:
            x, size = block(x, size)
        return x, size


class DaViT(nn.Module):
    """The DaViT image encoder (inference), returning pooled, normalised features.

    Parameters
    ----------
    depths, patch_size, patch_stride, patch_padding, patch_prenorm, embed_dims, num_heads, num_groups : sequences
        One value per stage, as ``IMAGE_ENCODER.SPEC`` of the published config
        (``DEPTHS``, ``PATCH_SIZE``, ``PATCH_STRIDE``, ``PATCH_PADDING``,
        ``PATCH_PRENORM``, ``DIM_EMBED``, ``NUM_HEADS``, ``NUM_GROUPS``).
    window_size : int
        ``WINDOW_SIZE`` (12 for MedImageInsight).
    mlp_ratio : float
        Hidden width of the MLPs relative to the stage width (4).
    in_chans : int
        Input channels (3).
    use_sdpa : bool
        Fused attention (default) or the explicit published form.
    """

    def __init__(
        self,
        *,
        depths: Sequence[int],
        patch_size: Sequence[int],
        patch_stride: Sequence[int],
        patch_padding: Sequence[int],
        patch_prenorm: Sequence[bool],
        embed_dims: Sequence[int],
        num_heads: Sequence[int],
        num_groups: Sequence[int],
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        lists = (depths, patch_size, patch_stride, patch_padding, patch_prenorm, num_heads, num_groups)
        if any(len(v) != n for v in lists):
            raise ValueError("DaViT: every per-stage list must have one value per stage")
        self.embed_dims = tuple(int(d) for d in embed_dims)
        self.convs = nn.ModuleList(
            _ConvEmbed(
                int(patch_size[i]),
                in_chans if i == 0 else self.embed_dims[i - 1],
                self.embed_dims[i],
                int(patch_stride[i]),
                int(patch_padding[i]),
                bool(patch_prenorm[i]),
            )
            for i in range(n)
        )
        self.blocks = nn.ModuleList(
            _Stage(
                _DualBlock(
                    _SpatialBlock(self.embed_dims[i], int(num_heads[i]), int(window_size), mlp_ratio, use_sdpa),
                    _ChannelBlock(self.embed_dims[i], int(num_groups[i]), mlp_ratio, use_sdpa),
                )
                for _ in range(int(depths[i]))
            )
            for i in range(n)
        )
        self.norms = nn.LayerNorm(self.embed_dims[-1])

    @property
    def dim_out(self) -> int:
        return self.embed_dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, 3, H, W)`` images to ``(b, embed_dims[-1])`` pooled features."""
        size: Size = (x.shape[2], x.shape[3])
        for conv, stage in zip(self.convs, self.blocks):
            x, size = conv(x, size)
            x, size = stage(x, size)
        return self.norms(x.mean(dim=1))
