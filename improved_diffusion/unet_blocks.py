"""
The building blocks of the UNets in :mod:`improved_diffusion.unet`: the timestep-aware
sequential container, up/downsampling layers, the residual block (optionally resampling
inside itself, ``resblock_updown`` of [ADM §3]), multi-head self-attention in both head
layouts (the original's "legacy" order and [ADM]'s "new" order) and the attention pooling
head of the noised classifier [ADM §4].

Attribute names and nesting follow the original implementations, so ``state_dict`` keys are
theirs whichever module defines a block (see SPEC.md and SPEC_GUIDED.md, "Architecture").
"""

import math
from abc import abstractmethod
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import Dropout, SiLU, SpeedSettings, avg_pool_nd, checkpoint, conv_nd, linear, normalization, zero_module


class TimestepBlock(nn.Module):
    """Any module whose ``forward`` takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """
        Apply the module to ``x`` given the timestep embedding ``emb``.

        :param x: shape ``(N, C, ...)``.
        :param emb: shape ``(N, E)``.
        """


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential module that passes the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


def _spatial_scale(dims: int) -> Union[int, Tuple[int, int, int]]:
    """Scale factor of an up/downsampling step: x2 on every spatial axis, except depth in 3D."""
    return (1, 2, 2) if dims == 3 else 2


class Upsample(nn.Module):
    """
    Nearest-neighbour x2 upsampling, optionally followed by a 3x3 convolution (key ``conv``).
    In 3D only the inner two dimensions are upsampled.

    :param channels: channels of the input and output.
    :param use_conv: whether to apply the convolution.
    :param dims: 1, 2 or 3 spatial dimensions.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: shape ``(N, C, ...)``. :return: shape ``(N, C, ...)`` with the sides doubled."""
        assert x.shape[1] == self.channels
        x = F.interpolate(x, scale_factor=_spatial_scale(self.dims), mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """
    x2 downsampling: a 3x3 convolution with stride 2 (key ``op``), or 2x2 average pooling.
    In 3D only the inner two dimensions are downsampled.

    :param channels: channels of the input and output.
    :param use_conv: convolution (True) or average pooling (False).
    :param dims: 1, 2 or 3 spatial dimensions.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        stride = _spatial_scale(dims)
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: shape ``(N, C, ...)``. :return: shape ``(N, C, ...)`` with the sides halved."""
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """
    A residual block conditioned on the timestep embedding [IDDPM App. A]: GroupNorm, SiLU, conv,
    then the embedding (added, or as scale and shift after the second norm), GroupNorm, SiLU,
    dropout and a zero-initialised conv; plus a skip connection.

    With ``up`` or ``down`` ([ADM §3], ``--resblock_updown``) the block also resamples: after
    the first GroupNorm and SiLU, both that activation and the skip input are upsampled
    (nearest x2) or average-pooled (2x2), then the first conv runs. The resampling has no
    parameters, so the keys are those of a plain residual block.

    :param channels: input channels.
    :param emb_channels: width E of the timestep embedding.
    :param dropout: dropout probability before the last convolution.
    :param out_channels: output channels (default: ``channels``).
    :param use_conv: when the channel count changes, use a 3x3 instead of a 1x1 conv on the skip.
    :param use_scale_shift_norm: FiLM conditioning, ``norm(h) * (1 + scale) + shift``.
    :param dims: 1, 2 or 3 spatial dimensions.
    :param use_checkpoint: gradient checkpointing of this block.
    :param up: upsample x2 inside the block.
    :param down: downsample x2 inside the block.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if self.updown:  # parameterless, so registering them here leaves the keys unchanged
            resample = Upsample if up else Downsample
            self.h_upd, self.x_upd = resample(channels, False, dims), resample(channels, False, dims)
        self.emb_layers = nn.Sequential(
            SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            SiLU(),
            Dropout(p=dropout),  # the mask does not depend on the memory layout
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """
        :param x: shape ``(N, C, ...)``.
        :param emb: shape ``(N, E)``.
        :return: shape ``(N, out_channels, ...)``.
        """
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.h_upd(self.in_layers[:-1](x))  # norm, SiLU, resample: (N, C, ...') with sides x2 or /2
            x = self.x_upd(x)  # the skip input resampled alike
            h = self.in_layers[-1](h)  # (N, C_out, ...')
        else:
            h = self.in_layers(x)  # (N, C_out, ...)
        emb_out = self.emb_layers(emb).to(h.dtype)  # (N, C_out) or (N, 2 * C_out)
        emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.dim() - 2))  # (N, C_out[*2], 1, ...)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)  # 2 x (N, C_out, 1, ...)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _plain_attention(qkv: torch.Tensor) -> torch.Tensor:
    """
    ``softmax(q^T k / sqrt(d)) v^T`` per head, the softmax in float32.

    :param qkv: shape ``(N, H, 3 * d, T)``: per head, d channels of q, then k, then v.
    :return: shape ``(N, H, d, T)``.
    """
    q, k, v = qkv.chunk(3, dim=2)  # 3 x (N, H, d, T)
    scale = 1 / math.sqrt(math.sqrt(q.shape[2]))  # scale q and k each: gentler on float16
    weight = torch.einsum("nhct,nhcs->nhts", q * scale, k * scale)  # (N, H, T_query, T_key)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.einsum("nhts,nhcs->nhct", weight, v)  # (N, H, d, T)


def _sdpa_attention(qkv: torch.Tensor) -> torch.Tensor:
    """Same as :func:`_plain_attention` through ``F.scaled_dot_product_attention``."""
    # Positions before channels, channels contiguous: what the flash / memory-efficient kernels
    # want (already so when qkv came from :func:`pointwise_linear`).
    qkv = qkv.transpose(2, 3)  # (N, H, T, 3d)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q, k, v = qkv.chunk(3, dim=-1)  # 3 x (N, H, T, d)
    out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, d)
    return out.transpose(2, 3)  # (N, H, d, T)


def pointwise_linear(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """
    ``conv(x)`` of a 1x1 ``Conv1d`` as one matrix product over the channels (``F.linear`` on
    the positions-first view), several times faster on CPUs than the convolution kernel for
    attention's projections, and the same numbers within float32 rounding.

    :param x: shape ``(N, C, T)``, any strides.
    :return: shape ``(N, O, T)``: a view of a contiguous ``(N, T, O)`` tensor (positions first).
    """
    return F.linear(x.transpose(1, 2), conv.weight.squeeze(-1), conv.bias).transpose(1, 2)


def _call(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return conv(x)


def attention(qkv: torch.Tensor, num_heads: int, new_order: bool = False, use_sdpa: bool = True) -> torch.Tensor:
    """
    Multi-head self-attention over all positions.

    Head layouts: the original's *legacy* order cuts the ``3 * C`` channels into ``num_heads``
    contiguous groups, each holding that head's q, k, v; the *new* order of [ADM] first splits
    them into q, k and v (C channels each), then each into heads. The same weights give
    different outputs in the two orders.

    :param qkv: shape ``(N, 3 * C, T)``.
    :param num_heads: number of heads H (C divisible by H).
    :param new_order: the [ADM] layout (``--use_new_attention_order``) instead of the legacy one.
    :param use_sdpa: SDPA (True) or the plain formula (False); the same numbers.
    :return: shape ``(N, C, T)``, the heads' outputs in order.
    """
    n, width, length = qkv.shape
    if new_order:
        qkv = qkv.reshape(n, 3, num_heads, width // (3 * num_heads), length)  # (N, 3, H, d, T)
        qkv = qkv.transpose(1, 2)  # (N, H, 3, d, T): per head q, k, v as in the legacy layout
    qkv = qkv.reshape(n, num_heads, width // num_heads, length)  # (N, H, 3d, T), d = C / H
    out = (_sdpa_attention if use_sdpa else _plain_attention)(qkv)  # (N, H, d, T)
    return out.reshape(n, -1, length)  # (N, C, T)


class AttentionBlock(nn.Module):
    """
    Self-attention over all spatial positions with a residual connection: GroupNorm (``norm``),
    a 1x1 conv to q, k, v (``qkv``), multi-head attention, a zero-initialised 1x1 conv
    (``proj_out``).

    :param channels: channels C (a multiple of the number of heads).
    :param num_heads: number of attention heads (ignored when ``num_head_channels`` is given).
    :param use_checkpoint: gradient checkpointing of this block.
    :param num_head_channels: if not -1, channels per head, so heads = C / num_head_channels [ADM].
    :param use_new_attention_order: the [ADM] head layout (see :func:`attention`).
    :param use_sdpa: attention through SDPA (see :func:`attention`) and the 1x1 projections by
        :func:`pointwise_linear`; a speed setting.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        use_checkpoint: bool = False,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
        use_sdpa: bool = True,
    ):
        super().__init__()
        self.use_sdpa = use_sdpa
        self.channels = channels
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def set_speed(self, speed: SpeedSettings, chooser: Any = None) -> None:
        """Take the ``sdpa`` setting of ``speed``."""
        self.use_sdpa = speed.sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: shape ``(N, C, ...)``. :return: the same shape."""
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        layout_is_channels_last = x.dim() == 4 and c > 1 and x.is_contiguous(memory_format=torch.channels_last)
        x = x.reshape(n, c, -1)  # (N, C, T), T = prod(spatial)
        project = pointwise_linear if self.use_sdpa else _call
        qkv = project(self.qkv, self.norm(x))  # (N, 3C, T)
        h = project(self.proj_out, attention(qkv, self.num_heads, self.use_new_attention_order, self.use_sdpa))
        out = (x + h).reshape(n, c, *spatial)  # (N, C, ...)
        if len(spatial) == 2 and layout_is_channels_last:
            out = out.contiguous(memory_format=torch.channels_last)  # keep the network's layout
        return out


class AttentionPool2d(nn.Module):
    """
    Attention pooling, the head of the noised classifier ([ADM §4], CLIP-style): the spatial
    positions plus their mean as an extra first token, a learned ``positional_embedding``, a
    1x1 conv to q, k, v (``qkv_proj``), new-order multi-head attention and a 1x1 conv to the
    outputs (``c_proj``); the result is the mean token's output.

    :param spacial_dim: side S of the square feature map (S * S positions).
    :param embed_dim: channels C of the input.
    :param num_heads_channels: channels per head (heads = C / num_heads_channels).
    :param output_dim: channels of the output (default ``embed_dim``).
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: Optional[int] = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: shape ``(N, C, S, S)``. :return: shape ``(N, output_dim)``."""
        n, c = x.shape[:2]
        x = x.reshape(n, c, -1)  # (N, C, T), T = S * S
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)  # (N, C, T + 1), the mean first
        x = x + self.positional_embedding[None].to(x.dtype)  # (N, C, T + 1)
        x = self.qkv_proj(x)  # (N, 3C, T + 1)
        x = attention(x, self.num_heads, new_order=True)  # (N, C, T + 1)
        return self.c_proj(x)[:, :, 0]  # (N, output_dim): the mean token
