"""Vision-transformer image towers of open_clip, in plain PyTorch.

Two towers, with the module names of the published code so that the ``visual.*``
tensors of an open_clip checkpoint (prefix removed) load with ``strict=True``, and the
same computation at inference (no dropout, drop-path or patch dropout):

:class:`OpenClipVisionTransformer`
    open_clip's own ``VisionTransformer`` (``transformer.py``; ViT-B-16 and friends)::

        conv1 (no bias), class_embedding, positional_embedding, ln_pre,
        transformer.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias,
        attn.out_proj, ls_1.gamma?, ln_2, mlp.c_fc, mlp.c_proj, ls_2.gamma?},
        ln_post, proj

    patches are embedded by a strided convolution, the class embedding is prepended,
    the positional embedding added, ``ln_pre`` (unless ``no_ln_pre``), pre-norm
    residual blocks (``nn.MultiheadAttention``, MLP ``c_fc`` - GELU or QuickGELU -
    ``c_proj``, optional LayerScale), then ``ln_post`` on every token and the class token
    taken (``pool_type='tok'``) or the patch tokens averaged (``'avg'``), or the pooling
    first and ``ln_post`` after it (``final_ln_after_pool``); finally ``@ proj``.
    LayerNorm epsilon 1e-5 (``nn.LayerNorm``'s default) unless the config says otherwise.

:class:`TimmVisionTransformer`
    the tower open_clip builds from a timm model name (``TimmModel``: ``trunk`` + ``head``),
    for timm's plain ``VisionTransformer`` family (``vit_{tiny,small,base,large,huge}_
    patch{P}_{S}``, BiomedCLIP's ``vit_base_patch16_224``)::

        trunk.{patch_embed.proj (bias), cls_token, pos_embed,
        blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm | fc_norm,
        head?}, head.proj | head.mlp.{fc1, fc2}

    timm's computation: patch embedding, class token concatenated then ``pos_embed``
    added (the class token has a position), pre-norm blocks (fused ``qkv`` linear,
    scaled dot-product attention, exact GELU MLP), LayerNorm epsilon 1e-6; then
    ``norm`` and the pooling (``token``: the class token; ``avg``/``max``/``avgmax``:
    over the patch tokens), or for a trunk built with an averaging pool, the pooling and
    then ``fc_norm``; then the trunk's own classifier (when open_clip uses it as the
    projection) and open_clip's head (``linear``: ``proj``; ``mlp``: ``fc1`` - GELU -
    ``fc2``, hidden ``2 x embed_dim``).

LayerNorms compute in float32 and cast back (open_clip's ``LayerNormFp32``, which it uses
for half precision); in float32 this is exactly ``nn.LayerNorm``.

This module imports torch at import time; :mod:`cxrstore.encoders.openclip` imports it
only when an encoder is built.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OpenClipVisionTransformer", "TimmVisionTransformer"]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32, cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI CLIP's ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (parameter ``gamma``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


# -- open_clip's native tower ---------------------------------------------------------------
class ResidualAttentionBlock(nn.Module):
    """open_clip's pre-norm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, *, quick_gelu: bool, ls: bool, eps: float) -> None:
        super().__init__()
        self.ln_1 = LayerNormFp32(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = LayerScale(width) if ls else nn.Identity()
        self.ln_2 = LayerNormFp32(width, eps=eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))
        self.ls_2 = LayerScale(width) if ls else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.ls_1(self.attn(y, y, y, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, **block: object) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, **block) for _ in range(layers)])  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x)
        return x


class OpenClipVisionTransformer(nn.Module):
    """open_clip's ``VisionTransformer`` image tower (inference).

    Parameters
    ----------
    image_size, patch_size : int or (int, int)
        Input size and patch size; the grid is ``image_size // patch_size``.
    width, layers, heads : int
        Token width, number of blocks, attention heads (``width // head_width``).
    mlp_ratio : float
        MLP hidden width over ``width``.
    output_dim : int
        ``embed_dim`` of the CLIP model (columns of ``proj``).
    quick_gelu : bool
        QuickGELU (OpenAI-trained weights) instead of exact GELU.
    layer_scale : bool
        LayerScale present (``ls_1.gamma``, ``ls_2.gamma``; open_clip's ``ls_init_value``).
    no_ln_pre : bool
        No LayerNorm before the blocks.
    pool_type : {"tok", "avg"}
        Class token, or mean of the patch tokens.
    final_ln_after_pool : bool
        Apply ``ln_post`` after pooling instead of to every token before it.
    eps : float
        LayerNorm epsilon.
    """

    def __init__(
        self,
        *,
        image_size: int | Sequence[int],
        patch_size: int | Sequence[int],
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        output_dim: int,
        quick_gelu: bool = False,
        layer_scale: bool = False,
        no_ln_pre: bool = False,
        pool_type: str = "tok",
        final_ln_after_pool: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if pool_type not in ("tok", "avg"):
            raise ValueError(f"pool_type must be 'tok' or 'avg', not {pool_type!r}")
        self.image_size = _pair(image_size)
        self.patch_size = _pair(patch_size)
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.output_dim = output_dim
        self.pool_type = pool_type
        self.final_ln_after_pool = final_ln_after_pool
        self.conv1 = nn.Conv2d(3, width, kernel_size=self.patch_size, stride=self.patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.ln_pre = nn.Identity() if no_ln_pre else LayerNormFp32(width, eps=eps)
        self.transformer = _Transformer(width, layers, heads, mlp_ratio, quick_gelu=quick_gelu, ls=layer_scale, eps=eps)
        self.ln_post = LayerNormFp32(width, eps=eps)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:].mean(dim=1) if self.pool_type == "avg" else x[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` normalised images to ``(n, output_dim)`` image features."""
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x)
        if self.final_ln_after_pool:
            pooled = self.ln_post(self._pool(x))
        else:
            pooled = self._pool(self.ln_post(x))
        return pooled @ self.proj


# -- timm's ViT trunk with open_clip's head ---------------------------------------------------
class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: tuple[int, int], width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimmAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class _TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int, *, bias2: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out, bias=bias2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = LayerNormFp32(dim, eps=eps)
        self.attn = _TimmAttention(dim, heads, qkv_bias)
        self.norm2 = LayerNormFp32(dim, eps=eps)
        self.mlp = _TimmMlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


_FC_NORM_POOLS = ("avg", "avgmax", "max")


class _TimmTrunk(nn.Module):
    """timm ``VisionTransformer`` (class token, learned position embedding with a class slot)."""

    def __init__(
        self,
        *,
        img_size: tuple[int, int],
        patch_size: tuple[int, int],
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        build_pool: str,
        global_pool: str,
        num_classes: int,
        eps: float,
    ) -> None:
        super().__init__()
        grid = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.global_pool = global_pool
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, grid[0] * grid[1] + 1, embed_dim))
        self.blocks = nn.Sequential(*[_TimmBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, eps) for _ in range(depth)])
        # timm decides norm-before-pool vs fc_norm-after-pool when the model is built
        use_fc_norm = build_pool in _FC_NORM_POOLS
        self.norm = nn.Identity() if use_fc_norm else LayerNormFp32(embed_dim, eps=eps)
        self.fc_norm = LayerNormFp32(embed_dim, eps=eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        x = x[:, 1:]
        if self.global_pool == "avg":
            return x.mean(dim=1)
        if self.global_pool == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.head(self.fc_norm(self._pool(x)))


class TimmVisionTransformer(nn.Module):
    """open_clip's ``TimmModel`` around timm's plain ``VisionTransformer`` (inference).

    Parameters
    ----------
    img_size, patch_size : (int, int)
        The trunk's input and patch size (from the timm model name and kwargs).
    embed_dim, depth, num_heads : int
        Trunk width, blocks and heads.
    mlp_ratio : float
        MLP hidden width over ``embed_dim``.
    qkv_bias : bool
        Bias in the fused ``qkv`` projection (timm's default True).
    output_dim : int
        The CLIP ``embed_dim``.
    pool : str
        open_clip's ``timm_pool``: ``""`` (the trunk's default, ``token``), ``token``,
        ``avg``, ``max`` or ``avgmax``.
    proj : str
        open_clip's ``timm_proj``: ``linear``, ``mlp``, or ``""``/``none`` (the trunk's own
        classifier of ``output_dim`` outputs is the projection; ``none``: no projection).
    proj_bias : bool
        ``timm_proj_bias``: bias in the last projection layer of the head.
    eps : float
        LayerNorm epsilon (timm: 1e-6).
    """

    def __init__(
        self,
        *,
        img_size: tuple[int, int],
        patch_size: tuple[int, int],
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        output_dim: int,
        pool: str = "",
        proj: str = "linear",
        proj_bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        extra_proj = proj in ("linear", "mlp")
        if extra_proj:
            # timm.create_model(name) with its default pool ('token'), then reset_classifier(0[, global_pool=pool])
            build_pool, global_pool, num_classes = "token", (pool or "token"), 0
        else:
            if not pool:
                raise ValueError("timm_pool '' with timm_proj '' or 'none' keeps every token; no pooled vector")
            build_pool = global_pool = pool
            num_classes = 0 if proj == "none" else output_dim
        if global_pool not in ("token", *_FC_NORM_POOLS):
            raise ValueError(f"unsupported timm pool {pool!r}")
        self.trunk = _TimmTrunk(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, build_pool=build_pool, global_pool=global_pool,
            num_classes=num_classes, eps=eps,
        )
        head: OrderedDict[str, nn.Module] = OrderedDict()
        if proj == "linear":
            head["drop"] = nn.Identity()
            head["proj"] = nn.Linear(embed_dim, output_dim, bias=proj_bias)
        elif proj == "mlp":
            head["mlp"] = _TimmMlp(embed_dim, 2 * output_dim, output_dim, bias2=proj_bias)
        self.head = nn.Sequential(head)
        self.output_dim = output_dim if proj != "none" else embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` normalised images to ``(n, output_dim)`` image features."""
        return self.head(self.trunk(x))
