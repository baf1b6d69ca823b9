"""
Mixed precision for training: one object owns the autocast dtype and the fp16 loss scaler.

Weights, gradients, optimizer state and EMA stay float32 (so checkpoints load into the
original); only the network's forward runs under ``torch.autocast``. Float16 uses
``torch.amp.GradScaler``, which plays the role of the original's hand-written dynamic loss
scale: start at 2^20, halve and skip the step on a non-finite gradient, and grow. The original
adds ``fp16_scale_growth`` to log2(scale) after every good step; here the scale doubles after
``round(1 / fp16_scale_growth)`` good steps in a row (the same average growth rate).
Bfloat16 has float32's range and needs no scaler.

On a CPU, ``use_fp16`` falls back to bfloat16 with a logged warning: float16 autocast on CPUs is
slow or unsupported for many ops, and bfloat16 is what CPUs accelerate.
"""

import contextlib
import math
import os
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch

from .errors import UserError

AUTO = "auto"  # a flag value: decide from the device

INITIAL_LG_LOSS_SCALE = 20.0


class MixedPrecision:
    """
    Autocast + (for float16 on CUDA) a gradient scaler, behind five calls: ``autocast()``,
    ``zero_grad()``, ``backward()``, ``step()`` and ``state_dict()``.

    :param device: the training device.
    :param use_fp16: float16 autocast with dynamic loss scaling (bfloat16 on a CPU).
    :param use_bf16: bfloat16 autocast, no loss scaling; ``"auto"``: only where the device runs
        bfloat16 natively (:func:`native_bf16`), else float32.
    :param fp16_scale_growth: log2 growth of the loss scale per good step (original's flag).
    :param log: called with a warning line (e.g. ``logger.log``) when fp16 falls back to bf16.
    """

    def __init__(
        self,
        device: torch.device,
        use_fp16: bool = False,
        use_bf16: Union[bool, str] = False,
        fp16_scale_growth: float = 1e-3,
        log: Optional[Any] = None,
    ):
        check_precision_flags(use_fp16, use_bf16, fp16_scale_growth)
        self.device = torch.device(device)
        if use_bf16 == AUTO:
            use_bf16 = native_bf16(self.device)
            if log is not None:
                log(f"--use_bf16 auto: {'bfloat16 autocast' if use_bf16 else 'float32'} on {self.device.type}")
        self.dtype: Optional[torch.dtype] = None
        self.scaler: Optional[torch.amp.GradScaler] = None
        if use_fp16 and self.device.type != "cuda":
            if log is not None:
                log(f"warning: --use_fp16 on {self.device.type}: using bfloat16 autocast instead")
            use_fp16, use_bf16 = False, True
        if use_fp16:
            interval = max(1, round(1.0 / fp16_scale_growth))
            self.dtype = torch.float16
            self.scaler = torch.amp.GradScaler(
                self.device.type,
                init_scale=2.0**INITIAL_LG_LOSS_SCALE,
                growth_factor=2.0 ** (fp16_scale_growth * interval),
                backoff_factor=0.5,
                growth_interval=interval,
            )
        elif use_bf16:
            self.dtype = torch.bfloat16
            if self.device.type == "cpu" and log is not None and not cpu_has_fast_bf16():
                log(
                    "warning: this CPU has no bfloat16 instructions (AVX-512 BF16 / AMX): bf16 will be slower than fp32"
                )

    @property
    def enabled(self) -> bool:
        """Whether the forward runs under autocast at all."""
        return self.dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the network's forward (a no-op in float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def zero_grad(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Drop the gradients of ``params`` (set to None, as ``Optimizer.zero_grad`` does)."""
        for p in params:
            p.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (multiplied by the loss scale in float16)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale in place (before measuring or clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
        """
        Take the optimizer step unless the gradient is not finite, without waiting for the device
        when the optimizer can skip by itself (a fused optimizer, :func:`make_adamw`): the
        decision travels to it as a device tensor, as ``GradScaler`` hands it ``found_inf``.
        Any other optimizer needs one host-device sync for the decision.

        :param grad_norm: 0-d tensor, the global L2 norm of the unscaled gradients.
        :return: 0-d bool tensor on the gradient's device: True if the step was taken, False
            if skipped (weights and optimizer state untouched).
        """
        finite = torch.isfinite(grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skips by itself when the grads hold inf/NaN
            self.scaler.update()
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        elif bool(finite):
            optimizer.step()
        return finite

    @property
    def lg_loss_scale(self) -> Optional[float]:
        """log2 of the current loss scale (float16 only; reading it syncs with the device)."""
        if self.scaler is None:
            return None
        return math.log2(self.scaler.get_scale())

    def state_dict(self) -> Dict[str, Any]:
        """The scaler's state (empty without one); plain numbers, safe for ``weights_only``."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state without scaler leaves the initial scale."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def check_precision_flags(use_fp16: bool, use_bf16: Union[bool, str], fp16_scale_growth: float = 1e-3) -> None:
    """A UserError naming the flag for fp16 together with bf16, or a loss-scale growth <= 0."""
    if use_bf16 not in (True, False, AUTO):
        raise UserError(f"--use_bf16 {use_bf16!r}: expected True, False or {AUTO}")
    if use_fp16 and use_bf16:
        raise UserError("--use_fp16 and --use_bf16 exclude each other: pick one")
    if fp16_scale_growth <= 0:
        raise UserError(f"--fp16_scale_growth {fp16_scale_growth}: must be positive")


class ModelCall:
    """
    The precision and layout boundary around a network, used by the trainer, the samplers and
    the benchmarks alike: the input optionally goes channels-last, the forward runs under the
    autocast of ``precision`` (none: float32), and the output comes back as float32, so the
    diffusion's own arithmetic (losses, posterior, bits/dim) always stays in float32.

    :param model: the network, called as ``model(x, t, **kwargs)``.
    :param precision: a :class:`MixedPrecision`, or None for float32.
    :param channels_last: make 4-d inputs channels-last first.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        precision: Optional[MixedPrecision] = None,
        channels_last: bool = False,
    ):
        self.model, self.precision, self.channels_last = model, precision, channels_last

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """:param x: shape ``(N, C, ...)``. :return: the model output, float32."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.precision.autocast() if self.precision is not None else contextlib.nullcontext():
            out = self.model(x, t, **kwargs)
        return out.float()


# cuBLAS needs a fixed workspace for deterministic results (read when CUDA creates its handles).
CUBLAS_WORKSPACE = ":4096:8"


def set_cuda_math(deterministic: bool = False, tf32: bool = False) -> str:
    """
    Set torch's process-wide choices of GPU arithmetic explicitly, rather than leave torch's
    defaults (which let cuDNN convolutions use TF32, so "float32" would not be float32).

    :param deterministic: ``torch.use_deterministic_algorithms`` (ops without a deterministic
        kernel warn), cuDNN's benchmark mode off, and ``CUBLAS_WORKSPACE_CONFIG`` (if unset);
        otherwise cuDNN picks the fastest kernel per shape (benchmark mode), which may differ
        between runs.
    :param tf32: allow TF32 (10-bit mantissa) in float32 matmuls and convolutions on Ampere and later.
    :return: one line for the log, e.g. ``cuda math: tf32=False, deterministic=False, cudnn.benchmark=True``.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if torch.are_deterministic_algorithms_enabled() != deterministic:  # the call imports the compiler (seconds)
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return f"cuda math: tf32={tf32}, deterministic={deterministic}, cudnn.benchmark={not deterministic}"


def make_adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """
    AdamW with the fused kernel where torch has one for the parameters' device: one kernel for
    all parameters, and it skips a non-finite step on the device (:meth:`MixedPrecision.step`
    needs no host sync). Elsewhere the plain (foreach) AdamW.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` as a float32 0-d tensor (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0).float()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bf16 units (emulation does
    not count), or a CPU with AVX-512 BF16 / AMX."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_fast_bf16()


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX-512 BF16 or AMX); else it emulates it slowly."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
