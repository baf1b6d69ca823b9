"""
The attention UNet of [IDDPM App. A] (the [DDPM] architecture with multi-head attention at chosen
resolutions, FiLM-style time conditioning and an optional class embedding) and its
super-resolution variant.

Attribute names, nesting and initialisation follow the original implementation exactly, so
``state_dict`` keys and shapes match and its released checkpoints load with ``strict=True``.

Mixed precision: run the model under ``torch.autocast`` (float16 on GPU, bfloat16 on CPU or
GPU) with float32 weights; normalisation and the plain-path attention softmax stay float32,
and the output is cast back to the input's dtype. ``convert_to_fp16`` / ``convert_to_fp32``
are kept for the original's callers and really convert the torso's convolution weights (the
original's fp16 mode); prefer autocast.
"""

import math
from abc import abstractmethod
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import winograd
from .errors import UserError
from .nn import (
    Dropout,
    SiLU,
    SpeedSettings,
    apply_speed,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

NORM_GROUPS = 32

# Channel multipliers per image side, used when --channel_mult is not given. 256/64/32 are the
# original's; 128, 28 and 16 are ours.
CHANNEL_MULTS = {
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    28: (1, 2, 2),
    16: (1, 2, 2),
}


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

    :param channels: input channels.
    :param emb_channels: width E of the timestep embedding.
    :param dropout: dropout probability before the last convolution.
    :param out_channels: output channels (default: ``channels``).
    :param use_conv: when the channel count changes, use a 3x3 instead of a 1x1 conv on the skip.
    :param use_scale_shift_norm: FiLM conditioning, ``norm(h) * (1 + scale) + shift``.
    :param dims: 1, 2 or 3 spatial dimensions.
    :param use_checkpoint: gradient checkpointing of this block.
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
    # Positions before channels, channels contiguous: what the flash / memory-efficient kernels want.
    qkv = qkv.transpose(2, 3).contiguous()  # (N, H, T, 3d)
    q, k, v = qkv.chunk(3, dim=-1)  # 3 x (N, H, T, d)
    out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, d)
    return out.transpose(2, 3)  # (N, H, d, T)


def attention(qkv: torch.Tensor, num_heads: int, use_sdpa: bool = True) -> torch.Tensor:
    """
    Multi-head self-attention over all positions, with the original's head layout: the
    ``3 * C`` channels are cut into ``num_heads`` contiguous groups, each holding q, k, v.

    :param qkv: shape ``(N, 3 * C, T)``.
    :param num_heads: number of heads H (C divisible by H).
    :param use_sdpa: SDPA (True) or the plain formula (False); the same numbers.
    :return: shape ``(N, C, T)``, the heads' outputs in order.
    """
    n, width, length = qkv.shape
    qkv = qkv.reshape(n, num_heads, width // num_heads, length)  # (N, H, 3d, T), d = C / H
    out = (_sdpa_attention if use_sdpa else _plain_attention)(qkv)  # (N, H, d, T)
    return out.reshape(n, -1, length)  # (N, C, T)


class AttentionBlock(nn.Module):
    """
    Self-attention over all spatial positions with a residual connection: GroupNorm (``norm``),
    a 1x1 conv to q, k, v (``qkv``), multi-head attention, a zero-initialised 1x1 conv
    (``proj_out``).

    :param channels: channels C (a multiple of ``num_heads``).
    :param num_heads: number of attention heads.
    :param use_checkpoint: gradient checkpointing of this block.
    :param use_sdpa: attention through SDPA (see :func:`attention`).
    """

    def __init__(self, channels: int, num_heads: int = 1, use_checkpoint: bool = False, use_sdpa: bool = True):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.use_sdpa = use_sdpa
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def set_speed(self, speed: SpeedSettings) -> None:
        """Take the ``sdpa`` setting of ``speed``."""
        self.use_sdpa = speed.sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: shape ``(N, C, ...)``. :return: the same shape."""
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        layout_is_channels_last = x.dim() == 4 and c > 1 and x.is_contiguous(memory_format=torch.channels_last)
        x = x.reshape(n, c, -1)  # (N, C, T), T = prod(spatial)
        qkv = self.qkv(self.norm(x))  # (N, 3C, T)
        h = self.proj_out(attention(qkv, self.num_heads, self.use_sdpa))  # (N, C, T)
        out = (x + h).reshape(n, c, *spatial)  # (N, C, ...)
        if len(spatial) == 2 and layout_is_channels_last:
            out = out.contiguous(memory_format=torch.channels_last)  # keep the network's layout
        return out


def _check_divisible(channels: int, divisor: int, what: str, flag: str) -> None:
    if channels % divisor:
        raise UserError(f"--{flag}: {channels} channels cannot be split into {divisor} {what}")


class UNetModel(nn.Module):
    """
    The full UNet with attention and timestep embedding [IDDPM App. A].

    :param in_channels: channels of the input ``x``.
    :param model_channels: base channel count C (the ``--num_channels`` flag).
    :param out_channels: channels of the output (3, or 6 with a learned variance).
    :param num_res_blocks: residual blocks per resolution.
    :param attention_resolutions: downsample factors (1, 2, 4, ...) at which to use attention;
        a factor of 4 means attention on feature maps 4x smaller than the input.
    :param dropout: dropout probability in the residual blocks.
    :param channel_mult: channel multiplier per resolution level.
    :param conv_resample: learned convolutions in the up/downsampling steps.
    :param dims: 1, 2 or 3 spatial dimensions.
    :param num_classes: number of classes for class conditioning; None = unconditional.
    :param use_checkpoint: gradient checkpointing (less memory, more compute).
    :param num_heads: attention heads in the downsampling half and the middle.
    :param num_heads_upsample: heads in the upsampling half; -1 = ``num_heads``.
    :param use_scale_shift_norm: FiLM-like time conditioning in the residual blocks.
    :param speed: the speed settings of its layers (default: SDPA and Winograd where they apply);
        :meth:`set_speed` changes them later. They never change ``state_dict`` keys.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        speed: Optional[SpeedSettings] = None,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_heads_upsample = num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self._check_channels()

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        # Registration order = the original's state_dict key order.
        self.input_blocks, skip_chans = self._build_input_blocks()
        ch = skip_chans[-1]
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, ch),
            self._attention_block(ch, num_heads),
            self._res_block(ch, ch),
        )
        self.output_blocks = self._build_output_blocks(skip_chans)
        ch = model_channels * channel_mult[0]  # the width the output blocks end at
        self.out = nn.Sequential(
            normalization(ch),
            SiLU(),
            zero_module(conv_nd(dims, ch, out_channels, 3, padding=1)),
        )
        self.set_speed(speed or SpeedSettings())

    def set_speed(self, speed: SpeedSettings) -> None:
        """Use ``speed`` in every layer from now on (kept as ``self.speed``)."""
        self.speed = speed
        apply_speed(self, speed)

    def _res_block(self, ch_in: int, ch_out: int) -> ResBlock:
        return ResBlock(
            ch_in,
            self.model_channels * 4,
            self.dropout,
            out_channels=ch_out,
            dims=self.dims,
            use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm,
        )

    def _attention_block(self, ch: int, num_heads: int) -> AttentionBlock:
        return AttentionBlock(ch, num_heads=num_heads, use_checkpoint=self.use_checkpoint)

    def _build_input_blocks(self) -> Tuple[nn.ModuleList, List[int]]:
        """The downsampling half and the channels of every block's output (all kept as skips)."""
        c = self.model_channels
        blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(self.dims, self.in_channels, c, 3, padding=1))])
        skip_chans = [c]
        ch, ds = c, 1  # ds: downsample factor of the current level
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: List[nn.Module] = [self._res_block(ch, mult * c)]
                ch = mult * c
                if ds in self.attention_resolutions:
                    layers.append(self._attention_block(ch, self.num_heads))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch, self.conv_resample, dims=self.dims)))
                skip_chans.append(ch)
                ds *= 2
        return blocks, skip_chans

    def _build_output_blocks(self, skip_chans: List[int]) -> nn.ModuleList:
        """The upsampling half; each block takes concat(h, last kept skip) along channels."""
        c, skip_chans = self.model_channels, list(skip_chans)
        blocks = nn.ModuleList([])
        ch, ds = skip_chans[-1], 2 ** (len(self.channel_mult) - 1)
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                layers: List[nn.Module] = [self._res_block(ch + skip_chans.pop(), mult * c)]
                ch = mult * c
                if ds in self.attention_resolutions:
                    layers.append(self._attention_block(ch, self.num_heads_upsample))
                if level and i == self.num_res_blocks:
                    layers.append(Upsample(ch, self.conv_resample, dims=self.dims))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        assert not skip_chans
        return blocks

    def _check_channels(self) -> None:
        """Flag-level checks: every width splits into 32 norm groups and into the heads."""
        for mult in self.channel_mult:
            ch = mult * self.model_channels
            _check_divisible(ch, NORM_GROUPS, "normalization groups", "num_channels")
            _check_divisible(ch, self.num_heads, "attention heads", "num_heads")
            _check_divisible(ch, self.num_heads_upsample, "attention heads", "num_heads_upsample")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the torso's weights (float16 only after :meth:`convert_to_fp16`)."""
        return next(self.input_blocks.parameters()).dtype

    inner_dtype = dtype  # the original's name

    def convert_to_fp16(self) -> None:
        """
        Cast the torso's convolution weights to float16 (the original's fp16 mode; norms,
        embeddings and ``out`` stay float32). Kept for compatibility: prefer float32 weights
        under ``torch.autocast``.
        """
        self._convert_torso(torch.float16)

    def convert_to_fp32(self) -> None:
        """Undo :meth:`convert_to_fp16`."""
        self._convert_torso(torch.float32)

    def _convert_torso(self, dtype: torch.dtype) -> None:
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in part.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    module.to(dtype)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Apply the model to a batch.

        :param x: shape ``(N, C_in, ...)``.
        :param timesteps: shape ``(N,)`` (or a scalar), integer or float.
        :param y: shape ``(N,)`` int64 labels, required if and only if class-conditional.
        :return: shape ``(N, C_out, ...)``, dtype of ``x``.
        """
        h = self._torso(x, timesteps, y)  # (N, C, ...)
        return self.out(h.to(x.dtype)).to(x.dtype)

    def get_feature_vectors(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None
    ) -> Dict[str, List[torch.Tensor]]:
        """
        The intermediate activations of a forward pass (as the original's method).

        :return: dict with keys ``down`` (input blocks' outputs), ``middle`` (one tensor) and
            ``up`` (output blocks' outputs), each a list of tensors in the input's dtype.
        """
        features: Dict[str, List[torch.Tensor]] = dict(down=[], middle=[], up=[])
        self._torso(x, timesteps, y, features)
        return {key: [t.to(x.dtype) for t in values] for key, values in features.items()}

    def _torso(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: Optional[torch.Tensor],
        features: Optional[Dict[str, List[torch.Tensor]]] = None,
    ) -> torch.Tensor:
        """Input, middle and output blocks; the activations go to ``features`` when given."""
        h, emb = x.to(self.dtype), self._embed(x, timesteps, y)
        if self.speed.winograd and winograd.prefers_channels_last(h, self.model_channels * self.channel_mult[0]):
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        if features is not None:
            features["down"].extend(skips)
            features["middle"].append(h)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)  # input (N, ch + skip_ch, ...)
            if features is not None:
                features["up"].append(h)
        return h

    def _embed(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """The time (+ class) embedding, shape ``(N, 4C)``."""
        if (y is not None) != (self.num_classes is not None):
            if y is None:
                raise UserError(
                    f"this model is class-conditional ({self.num_classes} classes, --class_cond True) "
                    "and needs labels y; pass y= (model_kwargs['y'])"
                )
            raise UserError("labels y were given to a model built without classes (--class_cond False)")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])  # one timestep for the whole batch
        assert timesteps.shape == (x.shape[0],), f"timesteps {tuple(timesteps.shape)} for batch {x.shape[0]}"
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))  # (N, 4C)
        if y is not None:
            assert y.shape == (x.shape[0],), f"labels {tuple(y.shape)} for batch {x.shape[0]}"
            emb = emb + self.label_emb(y)  # (N, 4C)
        return emb


class SuperResModel(UNetModel):
    """
    A UNet conditioned on a low-resolution image: ``low_res`` is upsampled bilinearly
    (align_corners False) to ``x``'s size and concatenated after ``x`` on the channel axis,
    so the first convolution sees ``2 * in_channels`` channels.

    Takes the arguments of :class:`UNetModel`; ``in_channels`` is that of ``x`` alone.
    """

    def __init__(self, in_channels: int, *args, **kwargs):
        super().__init__(in_channels * 2, *args, **kwargs)

    @staticmethod
    def upsample_low_res(x: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        """
        ``low_res`` resized to ``x``'s spatial size, bilinearly (align_corners False).

        :param x: shape ``(N, C, H, W)``.
        :param low_res: shape ``(N, C, h, w)``.
        :return: shape ``(N, C, H, W)``.
        """
        return F.interpolate(low_res, x.shape[2:], mode="bilinear", align_corners=False)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, low_res: Optional[torch.Tensor] = None, **kwargs
    ) -> torch.Tensor:
        """
        :param x: shape ``(N, C, H, W)``.
        :param timesteps: shape ``(N,)``.
        :param low_res: shape ``(N, C, h, w)``, required.
        :param kwargs: passed to :meth:`UNetModel.forward` (``y`` for class-conditional models).
        :return: shape ``(N, C_out, H, W)``.
        """
        x = self._with_low_res(x, low_res)
        return super().forward(x, timesteps, **kwargs)

    def get_feature_vectors(
        self, x: torch.Tensor, timesteps: torch.Tensor, low_res: Optional[torch.Tensor] = None, **kwargs
    ) -> Dict[str, List[torch.Tensor]]:
        """As :meth:`UNetModel.get_feature_vectors`, with the low-resolution input."""
        return super().get_feature_vectors(self._with_low_res(x, low_res), timesteps, **kwargs)

    def _with_low_res(self, x: torch.Tensor, low_res: Optional[torch.Tensor]) -> torch.Tensor:
        if low_res is None:
            raise UserError("the super-resolution model needs low_res= (model_kwargs['low_res'])")
        return torch.cat([x, self.upsample_low_res(x, low_res)], dim=1)  # (N, 2C, H, W)
