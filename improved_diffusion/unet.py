"""
The attention UNet of [IDDPM App. A] (the [DDPM] architecture with multi-head attention at chosen
resolutions, FiLM-style time conditioning and an optional class embedding), its
super-resolution variant, and the noised image classifier of [ADM §4] (the UNet's
downsampling half and middle block with a pooling head).

The [ADM] architecture options (Dhariwal & Nichol 2021, §3) are constructor arguments that
default to the original's behaviour: ``num_head_channels`` (heads of a fixed width),
``resblock_updown`` (resampling inside residual blocks), ``use_new_attention_order`` (q, k, v
split before the heads) and fractional channel multipliers (``int(mult * model_channels)``
channels per level). The blocks live in :mod:`improved_diffusion.unet_blocks` and are
re-exported here.

Attribute names, nesting and initialisation follow the original implementations exactly, so
``state_dict`` keys and shapes match and their released checkpoints load with ``strict=True``
(see SPEC.md, "Network architecture", and SPEC_GUIDED.md, "Architecture").

Mixed precision: run the model under ``torch.autocast`` (float16 on GPU, bfloat16 on CPU or
GPU) with float32 weights; normalisation and the plain-path attention softmax stay float32,
and the output is cast back to the input's dtype. ``convert_to_fp16`` / ``convert_to_fp32``
(and ``use_fp16=True``) are kept for the originals' callers and really convert the torso's
convolution weights (the originals' fp16 mode); prefer autocast.
"""

from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .nn import (
    SiLU,
    SpeedSettings,
    apply_speed,
    conv_nd,
    linear,
    normalization,
    prefers_channels_last,
    timestep_embedding,
    zero_module,
)
from .unet_blocks import (
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    ResBlock,
    TimestepBlock,
    TimestepEmbedSequential,
    Upsample,
    attention,
)

__all__ = [
    "AttentionBlock",
    "AttentionPool2d",
    "Downsample",
    "EncoderUNetModel",
    "ResBlock",
    "SuperResModel",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
    "attention",
]

NORM_GROUPS = 32

# Channel multipliers per image side, used when --channel_mult is not given. 256/64/32 are the
# original's, 512 and 128 guided-diffusion's (a level has int(mult * num_channels) channels),
# 28 and 16 are ours.
CHANNEL_MULTS = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    28: (1, 2, 2),
    16: (1, 2, 2),
}
# The super-resolution models' table: as above except 512, which guided's upsampler builds like 256.
SR_CHANNEL_MULTS = {**CHANNEL_MULTS, 512: (1, 1, 2, 2, 4, 4)}
CLASSIFIER_POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


def channel_mult_for(
    image_size: int, channel_mult: str = "", flag: str = "image_size", table: Optional[Dict[int, Tuple]] = None
) -> Tuple[float, ...]:
    """
    Channel multipliers for a side length: the ``--channel_mult`` flag when given (e.g.
    ``"1,2,2"``, or with fractions as in [ADM]'s 512 model, ``"0.5,1,1,2,2,4,4"``), else
    ``table`` (default :data:`CHANNEL_MULTS`, for 512/256/128/64/32/28/16). Whole numbers come
    back as ints, fractions as floats; a level has ``int(mult * num_channels)`` channels.
    """
    if channel_mult:
        return _parse_channel_mult(str(channel_mult))
    table = CHANNEL_MULTS if table is None else table
    if image_size not in table:
        sizes = ", ".join(str(s) for s in sorted(table))
        raise UserError(
            f"--{flag} {image_size} has no default channel multipliers (known sizes: {sizes}); "
            "pass --channel_mult, e.g. --channel_mult 1,2,2"
        )
    return table[image_size]


def _parse_channel_mult(channel_mult: str) -> Tuple[float, ...]:
    """``"0.5,1,2"`` -> ``(0.5, 1, 2)``; anything else than positive numbers is a UserError."""
    try:
        mult = tuple(float(m) for m in channel_mult.split(","))
    except ValueError:
        raise UserError(
            f"--channel_mult {channel_mult!r}: expected comma-separated positive numbers like 1,2,2 or 0.5,1,2"
        ) from None
    if not mult or any(not m > 0 or m == float("inf") for m in mult):
        raise UserError(f"--channel_mult {channel_mult!r}: multipliers must be positive numbers")
    return tuple(int(m) if m.is_integer() else m for m in mult)


def attention_downsample_factors(
    attention_resolutions: str, image_size: int, flag: str = "attention_resolutions"
) -> Tuple[int, ...]:
    """Turn ``--attention_resolutions "16,8"`` (feature-map sides) into downsample factors."""
    factors = []
    for part in str(attention_resolutions).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            side = int(part)
        except ValueError:
            raise UserError(
                f"--{flag} {attention_resolutions!r}: expected comma-separated feature-map sides like 16,8"
            ) from None
        if side <= 0:
            raise UserError(f"--{flag} {attention_resolutions!r}: sides must be positive")
        factors.append(image_size // side)
    return tuple(factors)


def _check_divisible(channels: int, divisor: int, what: str, flag: str) -> None:
    if channels % divisor:
        raise UserError(f"--{flag}: {channels} channels cannot be split into {divisor} {what}")


# The constructor arguments of _UNetBase, which both subclasses pass on unchanged.
_BASE_OPTIONS = (
    "in_channels",
    "model_channels",
    "num_res_blocks",
    "attention_resolutions",
    "dropout",
    "channel_mult",
    "conv_resample",
    "dims",
    "use_checkpoint",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
    "speed",
)


class _UNetBase(nn.Module):
    """
    What :class:`UNetModel` and :class:`EncoderUNetModel` share: the options, the timestep
    embedding (``time_embed``), builders for the downsampling half and the middle block, and
    the fp16 conversion. Subclasses register their modules in the original's key order.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float,
        channel_mult: Sequence[float],
        conv_resample: bool,
        dims: int,
        use_checkpoint: bool,
        num_heads: int,
        num_head_channels: int,
        num_heads_upsample: int,
        use_scale_shift_norm: bool,
        resblock_updown: bool,
        use_new_attention_order: bool,
        speed: Optional[SpeedSettings] = None,
    ):
        super().__init__()
        self.speed = speed or SpeedSettings()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.dims = dims
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order
        self._check_channels()
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

    def set_speed(self, speed: SpeedSettings) -> None:
        """Use ``speed`` in every layer from now on (kept as ``self.speed``); never changes ``state_dict`` keys."""
        self.speed = speed
        self.conv_chooser = apply_speed(self, speed)

    def speed_state(self) -> Dict[str, Any]:
        """The convolution paths chosen by timing so far (plain data), for a checkpoint's train state."""
        return dict(self.conv_chooser.decisions) if self.conv_chooser is not None else {}

    def load_speed_state(self, state: Dict[str, Any]) -> None:
        """Take the decisions of :meth:`speed_state`, so a resumed run computes as the saved one did."""
        if self.conv_chooser is not None:
            self.conv_chooser.decisions.update(state)

    def speed_report(self) -> List[str]:
        """Lines on the convolution paths chosen by measurement since the last call (``winograd="auto"``)."""
        return self.conv_chooser.report() if self.conv_chooser is not None else []

    def _level_channels(self, mult: float) -> int:
        """Channels of a level with multiplier ``mult``: ``int(mult * model_channels)`` [ADM]."""
        return int(mult * self.model_channels)

    def _check_channels(self) -> None:
        """Flag-level checks: every width splits into 32 norm groups and into the heads."""
        if self.num_head_channels == 0 or self.num_head_channels < -1:
            raise UserError(
                f"--num_head_channels {self.num_head_channels}: expected -1 (heads by count) or a width > 0"
            )
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            ch = self._level_channels(mult)
            _check_divisible(ch, NORM_GROUPS, "normalization groups", "num_channels")
            if self.num_head_channels == -1:
                _check_divisible(ch, self.num_heads, "attention heads", "num_heads")
                _check_divisible(ch, self.num_heads_upsample, "attention heads", "num_heads_upsample")
            elif (2**level in self.attention_resolutions or level == last) and ch % self.num_head_channels:
                raise UserError(  # only levels with attention (the middle block's is the last level)
                    f"--num_head_channels: {ch} channels cannot be split into heads "
                    f"of {self.num_head_channels} channels"
                )

    def _res_block(self, ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
        return ResBlock(
            ch_in,
            self.model_channels * 4,
            self.dropout,
            out_channels=ch_out,
            dims=self.dims,
            use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
        )

    def _attention_block(self, ch: int, num_heads: int) -> AttentionBlock:
        return AttentionBlock(
            ch,
            num_heads=num_heads,
            use_checkpoint=self.use_checkpoint,
            num_head_channels=self.num_head_channels,
            use_new_attention_order=self.use_new_attention_order,
        )

    def _resample(self, ch: int, up: bool) -> nn.Module:
        """The x2 up/downsampling layer: a residual block with ``resblock_updown`` [ADM], else a plain layer."""
        if self.resblock_updown:
            return self._res_block(ch, ch, up=up, down=not up)
        return (Upsample if up else Downsample)(ch, self.conv_resample, dims=self.dims)

    def _build_input_blocks(self) -> Tuple[nn.ModuleList, List[int]]:
        """The downsampling half and the channels of every block's output (all kept as skips)."""
        ch = self._level_channels(self.channel_mult[0])
        blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(self.dims, self.in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1  # downsample factor of the current level
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: List[nn.Module] = [self._res_block(ch, self._level_channels(mult))]
                ch = self._level_channels(mult)
                if ds in self.attention_resolutions:
                    layers.append(self._attention_block(ch, self.num_heads))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(self._resample(ch, up=False)))
                skip_chans.append(ch)
                ds *= 2
        return blocks, skip_chans

    def _build_middle_block(self, ch: int) -> TimestepEmbedSequential:
        return TimestepEmbedSequential(
            self._res_block(ch, ch),
            self._attention_block(ch, self.num_heads),
            self._res_block(ch, ch),
        )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the torso's weights (float16 only after :meth:`convert_to_fp16`)."""
        return next(self.input_blocks.parameters()).dtype

    inner_dtype = dtype  # the original's name

    def convert_to_fp16(self) -> None:
        """
        Cast the torso's convolution weights to float16 (the originals' fp16 mode; norms,
        embeddings and ``out`` stay float32). Kept for compatibility: prefer float32 weights
        under ``torch.autocast``.
        """
        self._convert_torso(torch.float16)

    def convert_to_fp32(self) -> None:
        """Undo :meth:`convert_to_fp16`."""
        self._convert_torso(torch.float32)

    def _convert_torso(self, dtype: torch.dtype) -> None:
        for name in ("input_blocks", "middle_block", "output_blocks"):
            for module in getattr(self, name, nn.Sequential()).modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    module.to(dtype)

    def _time_embedding(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The timestep embedding, shape ``(N, 4C)``; a scalar timestep is used for the whole batch."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])  # one timestep for the whole batch
        assert timesteps.shape == (x.shape[0],), f"timesteps {tuple(timesteps.shape)} for batch {x.shape[0]}"
        return self.time_embed(timestep_embedding(timesteps, self.model_channels))  # (N, 4C)

    def _input_block_outputs(self, x: torch.Tensor, emb: torch.Tensor) -> Iterator[torch.Tensor]:
        """
        The outputs of the input blocks in order, from ``x`` in the torso's dtype; channels-last
        throughout where the Winograd path prefers it (a one-channel input is both layouts, so the
        first convolution alone would return NCHW and every later layer would change layouts).
        """
        h = x.to(self.dtype)
        channels_last = prefers_channels_last(
            self.speed, self.conv_chooser, h, self._level_channels(self.channel_mult[0])
        )
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        for module in self.input_blocks:
            h = module(h, emb)
            if channels_last:
                h = h.contiguous(memory_format=torch.channels_last)  # a no-op where it already is
            yield h


class UNetModel(_UNetBase):
    """
    The full UNet with attention and timestep embedding [IDDPM App. A], with the [ADM] options.

    :param in_channels: channels of the input ``x``.
    :param model_channels: base channel count C (the ``--num_channels`` flag).
    :param out_channels: channels of the output (3, or 6 with a learned variance).
    :param num_res_blocks: residual blocks per resolution.
    :param attention_resolutions: downsample factors (1, 2, 4, ...) at which to use attention;
        a factor of 4 means attention on feature maps 4x smaller than the input.
    :param dropout: dropout probability in the residual blocks.
    :param channel_mult: channel multiplier per resolution level; a level has
        ``int(mult * model_channels)`` channels, so fractions such as 0.5 are allowed [ADM].
    :param conv_resample: learned convolutions in the up/downsampling steps.
    :param dims: 1, 2 or 3 spatial dimensions.
    :param num_classes: number of classes for class conditioning; None = unconditional.
    :param use_checkpoint: gradient checkpointing (less memory, more compute).
    :param num_heads: attention heads in the downsampling half and the middle.
    :param num_heads_upsample: heads in the upsampling half; -1 = ``num_heads``.
    :param use_scale_shift_norm: FiLM-like time conditioning in the residual blocks.
    :param num_head_channels: if not -1, every attention layer has channels / num_head_channels
        heads (overrides ``num_heads`` and ``num_heads_upsample``) [ADM].
    :param resblock_updown: up/downsample with residual blocks instead of plain layers [ADM].
    :param use_new_attention_order: split q, k, v before the heads [ADM] (see :func:`attention`).
    :param use_fp16: convert the torso's convolution weights to float16 (the originals' fp16
        mode, :meth:`convert_to_fp16`); prefer float32 weights under ``torch.autocast``.
    :param image_size: accepted for guided-diffusion's signature; the network does not use it.
    :param class_dropout_prob: label dropout for classifier-free guidance [CFG Alg. 1]: in
        training mode each label is replaced by the null label ``num_classes`` with this
        probability. When positive, the label table has ``num_classes + 1`` rows (the last one
        the null label, :attr:`null_label`); at 0 it has exactly ``num_classes``, as before.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        num_head_channels: int = -1,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_fp16: bool = False,
        image_size: Optional[int] = None,
        speed: Optional[SpeedSettings] = None,
        class_dropout_prob: float = 0.0,
    ):
        super().__init__(**{name: value for name, value in locals().items() if name in _BASE_OPTIONS})
        self.image_size = image_size
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        # The label of "no label" [CFG Alg. 1]: one extra row of the table, only with label dropout.
        self.null_label = num_classes if num_classes is not None and class_dropout_prob > 0 else None
        # Registration order = the original's state_dict key order.
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + (self.null_label is not None), model_channels * 4)
        self.input_blocks, skip_chans = self._build_input_blocks()
        self.middle_block = self._build_middle_block(skip_chans[-1])
        self.output_blocks = self._build_output_blocks(skip_chans)
        ch = self._level_channels(self.channel_mult[0])  # the width the output blocks end at
        self.out = nn.Sequential(
            normalization(ch),
            SiLU(),
            zero_module(conv_nd(dims, ch, out_channels, 3, padding=1)),
        )
        self.set_speed(self.speed)
        if use_fp16:
            self.convert_to_fp16()

    def _build_output_blocks(self, skip_chans: List[int]) -> nn.ModuleList:
        """The upsampling half; each block takes concat(h, last kept skip) along channels."""
        skip_chans = list(skip_chans)
        blocks = nn.ModuleList([])
        ch, ds = skip_chans[-1], 2 ** (len(self.channel_mult) - 1)
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                layers: List[nn.Module] = [self._res_block(ch + skip_chans.pop(), self._level_channels(mult))]
                ch = self._level_channels(mult)
                if ds in self.attention_resolutions:
                    layers.append(self._attention_block(ch, self.num_heads_upsample))
                if level and i == self.num_res_blocks:
                    layers.append(self._resample(ch, up=True))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        assert not skip_chans
        return blocks

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
        emb = self._embed(x, timesteps, y)
        skips = list(self._input_block_outputs(x, emb))
        h = self.middle_block(skips[-1], emb)
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
        emb = self._time_embedding(x, timesteps)  # (N, 4C)
        if y is not None:
            assert y.shape == (x.shape[0],), f"labels {tuple(y.shape)} for batch {x.shape[0]}"
            if self.training and self.null_label is not None:
                y = self.drop_labels(y)
            emb = emb + self.label_emb(y)  # (N, 4C)
        return emb

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """
        Each label replaced by :attr:`null_label` with probability ``class_dropout_prob``
        [CFG Alg. 1] (uniforms from the global RNG, as dropout's).

        :param y: (N,) int64 labels.
        :return: (N,) int64 labels.
        """
        dropped = torch.rand(y.shape, device=y.device) < self.class_dropout_prob
        return torch.where(dropped, torch.full_like(y, self.null_label), y)


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


class EncoderUNetModel(_UNetBase):
    """
    The noised image classifier of [ADM §4]: the UNet's downsampling half and middle block
    (same options, time-conditioned, no label input) followed by a pooling head to logits.

    Heads (``pool``, the ``--classifier_pool`` flag):

    - ``adaptive``: GroupNorm, SiLU, global average pool, zero-initialised 1x1 conv, flatten;
    - ``attention``: GroupNorm, SiLU, :class:`AttentionPool2d` (needs ``num_head_channels``);
    - ``spatial``: the spatial means of every input block's and the middle block's output,
      concatenated, then Linear(-> 2048), ReLU, Linear;
    - ``spatial_v2``: as ``spatial`` with Linear(-> 2048), GroupNorm, SiLU, Linear.

    :param image_size: side of the (square) input; sizes the attention pool.
    :param out_channels: number of classes.
    :param pool: the head, one of ``CLASSIFIER_POOLS``.
    :param use_fp16: convert the torso's convolution weights to float16 (prefer autocast).

    Other parameters as in :class:`UNetModel` (``num_heads_upsample`` is accepted for
    guided-diffusion's signature and unused: there is no upsampling half).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
        speed: Optional[SpeedSettings] = None,
    ):
        if pool not in CLASSIFIER_POOLS:
            allowed = ", ".join(repr(p) for p in CLASSIFIER_POOLS)
            raise UserError(f"--classifier_pool {pool!r}: expected one of {allowed}")
        if pool == "attention" and num_head_channels == -1:
            raise UserError("--classifier_pool 'attention' needs heads of a fixed width: set num_head_channels")
        super().__init__(**{name: value for name, value in locals().items() if name in _BASE_OPTIONS})
        self.image_size = image_size
        self.out_channels = out_channels
        self.pool = pool
        self.input_blocks, skip_chans = self._build_input_blocks()
        ch = skip_chans[-1]
        self.middle_block = self._build_middle_block(ch)
        self.out = self._build_head(ch, sum(skip_chans) + ch)
        self.set_speed(self.speed)
        if use_fp16:
            self.convert_to_fp16()

    def _build_head(self, ch: int, feature_size: int) -> nn.Sequential:
        """The pooling head for ``self.pool``; ``feature_size`` = channels of the spatial means."""
        if self.pool == "adaptive":
            return nn.Sequential(
                normalization(ch),
                SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(self.dims, ch, self.out_channels, 1)),
                nn.Flatten(),
            )
        if self.pool == "attention":
            side = self.image_size // 2 ** (len(self.channel_mult) - 1)
            return nn.Sequential(
                normalization(ch), SiLU(), AttentionPool2d(side, ch, self.num_head_channels, self.out_channels)
            )
        if self.pool == "spatial":
            return nn.Sequential(linear(feature_size, 2048), nn.ReLU(), linear(2048, self.out_channels))
        return nn.Sequential(linear(feature_size, 2048), normalization(2048), SiLU(), linear(2048, self.out_channels))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        Classify noised images.

        :param x: shape ``(N, C_in, H, W)``, the noised images x_t.
        :param timesteps: shape ``(N,)`` (or a scalar), integer or float: what the diffusion
            model sees for x_t.
        :return: shape ``(N, out_channels)`` logits, dtype of ``x``.
        """
        emb = self._time_embedding(x, timesteps)  # (N, 4C)
        spatial = self.pool.startswith("spatial")
        means = []  # spatial pools: the mean of every block's output, (N, ch) each
        for h in self._input_block_outputs(x, emb):
            if spatial:
                means.append(h.to(x.dtype).mean(dim=tuple(range(2, h.dim()))))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(x.dtype).mean(dim=tuple(range(2, h.dim()))))
            return self.out(torch.cat(means, dim=-1)).to(x.dtype)  # input (N, feature_size)
        return self.out(h.to(x.dtype)).to(x.dtype)
