"""
Layers and helpers shared by the UNet: the sinusoidal timestep embedding of [DDPM §4]
(Transformer-style, as used by [IDDPM App. A]), float32 group normalisation, dimension-generic
convolution / pooling constructors, layout-independent dropout, zero-initialisation helpers,
gradient checkpointing, and the speed settings a model carries.

Mixed precision: every layer here works under ``torch.autocast`` (float16 or bfloat16).
:func:`normalization` always computes in float32 and casts back, as the original's GroupNorm32.
"""

import dataclasses
import math
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import native, winograd
from .errors import UserError

AUTO = "auto"

# ---------------------------------------------------------------------------------------------
# Speed settings: knobs that change speed but not results (within float32 tolerance). They are
# a model's own setting (constructor argument or :func:`apply_speed`), never process state, so
# two models in one process can differ.


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
    """
    Speed knobs of a network.

    :param sdpa: attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient
        kernels on GPU) instead of the plain ``softmax(q k^T / sqrt(d)) v`` formula with a
        float32 softmax, and its 1x1 projections as matrix products over the channels instead
        of convolutions (:func:`improved_diffusion.unet_blocks.pointwise_linear`). Both give the
        same numbers within float32 tolerance.
    :param winograd: float32 3x3 convolutions on CPUs through Winograd F(4x4, 3x3)
        (:mod:`improved_diffusion.winograd`: 4x fewer multiplications, channels-last output)
        instead of the direct convolution; differs from it by ~1e-5 relative. ``"auto"`` (the
        default) times both paths for each layer shape on first use and keeps the faster
        (:class:`~improved_diffusion.winograd.PathChooser`); True takes Winograd wherever the
        fixed size rule says it pays (:func:`~improved_diffusion.winograd.worthwhile`); False
        never. Never used on GPUs, under autocast or inside ``torch.compile``, so the default
        is the fastest exact-enough path on every device.
    :param winograd_cache: with ``winograd="auto"``, a JSON file that keeps the measured
        decisions for later runs ("" = this process only).
    :param native_kernels: CPU kernels compiled from C on first use
        (:mod:`improved_diffusion.native`) for the Winograd path's tile transforms and for
        GroupNorm of channels-last float32 images (torch ops where no C compiler works); False:
        always torch ops. Same numbers within float32 rounding.
    """

    sdpa: bool = True
    winograd: Union[bool, str] = AUTO
    winograd_cache: str = ""
    native_kernels: bool = True

    def __post_init__(self) -> None:
        if self.winograd not in (True, False, AUTO):
            raise UserError(f"--winograd {self.winograd!r}: expected True, False or {AUTO}")

    def summary(self) -> str:
        """One line for the log, e.g. ``speed settings: sdpa=True, winograd=auto, native_kernels=True``
        (the Winograd cache only where Winograd is on and a cache is set)."""
        items = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if not (k == "winograd_cache" and (self.winograd is False or v == ""))
        }
        return "speed settings: " + ", ".join(f"{k}={v}" for k, v in items.items())


PLAIN_SPEED = SpeedSettings(sdpa=False, winograd=False, native_kernels=False)  # the original's computation


def apply_speed(module: nn.Module, speed: SpeedSettings) -> Optional[winograd.PathChooser]:
    """
    Give every speed-aware layer inside ``module`` (those with ``set_speed``) the settings
    ``speed``; with ``winograd="auto"`` they share one new :class:`~improved_diffusion.winograd.PathChooser`.

    :return: that chooser, or None.
    """
    chooser = (
        winograd.PathChooser(speed.winograd_cache, native=speed.native_kernels) if speed.winograd == AUTO else None
    )
    for child in module.modules():
        if child is not module and hasattr(child, "set_speed"):
            child.set_speed(speed, chooser)
    return chooser


def prefers_channels_last(
    speed: SpeedSettings, chooser: Optional[winograd.PathChooser], x: torch.Tensor, channels: int
) -> bool:
    """
    Whether a network whose first level has ``channels`` channels should take ``x`` in
    channels-last layout: its first-level convolutions take the Winograd path, which returns
    channels-last tensors, so every layer then sees one layout (mixed layouts cost a
    conversion at each residual addition). With ``"auto"``, the chooser decides for that
    layer shape in channels-last layout.
    """
    if speed.winograd is False or not winograd.fast_input(x):
        return False
    if speed.winograd is True:
        return winograd.worthwhile(channels, channels, *x.shape[-2:])
    probe = x.new_empty((x.shape[0], channels, *x.shape[-2:])).contiguous(memory_format=torch.channels_last)
    return chooser.use_winograd(channels, channels, probe, training=torch.is_grad_enabled())


# ---------------------------------------------------------------------------------------------
# Layers

# The original defined its own SiLU for old PyTorch versions; torch's is the same function.
SiLU = nn.SiLU


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 (autocast off) and cast back to the input's dtype; on
    channels-last CPU images (and their positions-first ``(N, C, T)`` views) by the compiled
    kernel where its ``native_kernels`` setting is on (:func:`improved_diffusion.native.group_norm`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.native = True

    def set_speed(self, speed: SpeedSettings, chooser: Optional[winograd.PathChooser] = None) -> None:
        """Take the ``native_kernels`` setting of ``speed``."""
        self.native = speed.native_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x32, weight, bias = x.float(), self.weight.float(), self.bias.float()
            out = None
            # (N, C, T) positions-first (attention's view of a channels-last map) is (N, C, T, 1) channels-last.
            image = x32.unsqueeze(-1) if x32.dim() == 3 else x32
            if self.native and native.group_norm_applies(image, self.num_groups):
                out = native.group_norm(image, self.num_groups, weight, bias, self.eps)
                out = out.squeeze(-1) if x32.dim() == 3 else out
            if out is None:
                out = F.group_norm(x32, self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> nn.Module:
    """
    The standard normalisation layer: GroupNorm with 32 groups, computed in float32.

    :param channels: number of input channels (a multiple of 32).
    :return: an ``nn.Module`` mapping ``(N, channels, ...)`` to the same shape and dtype.
    """
    return GroupNorm32(32, channels)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state_dict keys) that takes the Winograd path when its
    ``use_winograd`` setting is on and :func:`improved_diffusion.winograd.applicable` says it can."""

    def __init__(self, *args: Any, use_winograd: Union[bool, str] = AUTO, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.use_winograd, self.native = use_winograd, True
        self.chooser: Optional[winograd.PathChooser] = None

    def set_speed(self, speed: SpeedSettings, chooser: Optional[winograd.PathChooser] = None) -> None:
        """Take the ``winograd`` settings of ``speed`` (and, for ``"auto"``, the model's chooser)."""
        self.use_winograd, self.native, self.chooser = speed.winograd, speed.native_kernels, chooser

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._winograd_for(x):
            return winograd.conv3x3(x, self.weight, self.bias, native=self.native)
        return super().forward(x)

    def _winograd_for(self, x: torch.Tensor) -> bool:
        if self.use_winograd is False or not winograd.eligible(self, x):
            return False
        if self.use_winograd is True or self.chooser is None:
            return winograd.worthwhile(self.in_channels, self.out_channels, *x.shape[-2:])
        training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return self.chooser.use_winograd(self.in_channels, self.out_channels, x, training)


class Dropout(nn.Dropout):
    """
    ``nn.Dropout`` whose mask does not depend on the memory layout: the random numbers are
    drawn in the logical (contiguous ``N, C, H, W``) order, so a channels-last activation gets
    the same mask as the contiguous one for the same seed. On a contiguous input it draws and
    computes exactly as ``F.dropout`` (``x * bernoulli(1 - p) / (1 - p)``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        keep = 1.0 - self.p
        noise = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)  # contiguous
        return x * noise


_CONVS = {1: nn.Conv1d, 2: Conv2d, 3: nn.Conv3d}
_AVG_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _by_dims(table: dict, dims: int, what: str) -> type:
    if dims not in table:
        raise ValueError(f"unsupported dimensions for {what}: {dims} (expected 1, 2 or 3)")
    return table[dims]


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D convolution module (arguments as for ``nn.ConvNd``)."""
    return _by_dims(_CONVS, dims, "conv_nd")(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D average pooling module (arguments as for ``nn.AvgPoolNd``)."""
    return _by_dims(_AVG_POOLS, dims, "avg_pool_nd")(*args, **kwargs)


def linear(*args, **kwargs) -> nn.Module:
    """A linear module (arguments as for ``nn.Linear``)."""
    return nn.Linear(*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of ``module`` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply the parameters of ``module`` by ``scale`` in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """
    Mean over all non-batch dimensions.

    :param tensor: shape ``(N, ...)``.
    :return: shape ``(N,)``, same dtype.
    """
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


@torch.no_grad()
def update_ema(
    target_params: Iterable[torch.Tensor], source_params: Iterable[torch.Tensor], rate: float = 0.99
) -> None:
    """
    Move target parameters towards source parameters: ``target = rate * target + (1 - rate) * source``.

    :param target_params: the EMA parameters, updated in place.
    :param source_params: the current model parameters.
    :param rate: the EMA rate (closer to 1 = slower).
    """
    for targ, src in zip(target_params, source_params):
        targ.mul_(rate).add_(src, alpha=1 - rate)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """
    Sinusoidal timestep embeddings [DDPM §4, App. B]: cosines of ``t * f_i`` then sines,
    with ``f_i = exp(-ln(max_period) * i / half)`` computed in float32 (``half = dim // 2``).

    :param timesteps: shape ``(N,)``, integer or float (fractional timesteps are allowed).
    :param dim: embedding width; an odd width gets one zero column at the end.
    :param max_period: controls the lowest frequency.
    :return: shape ``(N, dim)``, float32.
    """
    half = dim // 2
    # Multiply by the scalar first, then divide by half: the golden vectors pin this order.
    freqs = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(freqs)  # (half,)
    args = timesteps[:, None].float() * freqs[None]  # (N, 1) * (1, half) -> (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
    return embedding


def checkpoint(
    func: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], params: Iterable[torch.Tensor], flag: bool
) -> torch.Tensor:
    """
    Evaluate ``func(*inputs)``, with gradient checkpointing when ``flag`` is set: activations
    are not kept and are recomputed in the backward pass, trading compute for memory.

    Built on ``torch.utils.checkpoint`` (non-reentrant), which finds the parameters ``func``
    uses by itself and restores the RNG state (dropout) for the recomputation.

    :param func: the function to evaluate.
    :param inputs: the positional arguments of ``func``.
    :param params: the parameters ``func`` depends on; kept for the original's signature and
        not needed by the non-reentrant implementation.
    :param flag: if False, just call ``func``.
    :return: ``func(*inputs)``.
    """
    del params  # the non-reentrant checkpoint tracks parameters itself
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
