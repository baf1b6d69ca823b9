"""
CPU kernels compiled from C on first use: the Winograd tile transforms
(``csrc/winograd_transforms.c``, for :mod:`improved_diffusion.winograd`) and GroupNorm of
channels-last images (``csrc/group_norm.c``), each one or two passes over memory.

The torch-ops Winograd transforms gather tiles, transform rows, transform columns, scatter and
transpose in separate passes over multi-megabyte temporaries; the compiled ones read each input
once and write each output once (channels-last images in, the ``(36, T, C)`` matrices of the
batched products out, and back). torch's GroupNorm backward on channels-last data takes 2-3x its
NCHW time, and its channels-last statistics lose precision for inputs with a large mean (largest
error against float64 at mean 30, std 0.5: 8.9e-3, NCHW 1.2e-5); the compiled one is two passes
with double statistics (1.3e-5 there). Together they are what makes the Winograd path's
channels-last network gain on AVX-512 CPUs (benchmarks/README.md, "Compiled kernels"). Matrix
products stay with torch (MKL / oneDNN).

The C files are compiled into one library with the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) for this CPU (``-O3 -march=native -fopenmp``: the library then shares
torch's own OpenMP runtime and threads) and kept in a cache folder
(``$IMPROVED_DIFFUSION_CACHE``, else ``$XDG_CACHE_HOME/improved_diffusion``, else
``~/.cache/improved_diffusion``; a folder under the system's temporary one where none of these
can be written) under a name that hashes the sources, the compiler, its flags
and the CPU, written under a temporary name and renamed, so concurrent ranks never load a
half-written library. Each kernel family is checked against its torch reference before first
use. Where no compiler works, or a check fails, the loaders return None, say why once in the
log, and the torch ops are used instead: the same numbers within float32 rounding.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import logger

SOURCES = tuple(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", name)
    for name in ("winograd_transforms.c", "group_norm.c")
)
_FLAGS = ("-O3", "-std=c99", "-ffp-contract=fast", "-shared", "-fPIC", "-pthread")
# Tried in this order: OpenMP (which then shares torch's OpenMP runtime and threads) for this
# CPU, then without OpenMP (POSIX threads), then for any CPU of the architecture.
_ARCH_FLAGS = (("-fopenmp", "-march=native"), ("-march=native",), ())

_LOCK = threading.Lock()
# What this process has loaded and checked, by name ("library", "transforms", "group_norm"):
# a cache of capabilities, so each is built and checked once.
_LOADED: Dict[str, Any] = {}


class NativeTransforms:
    """
    The four compiled transforms, on float32 tensors (shapes checked, no copies made).

    Images are ``(N, H, W, C)`` contiguous (a channels-last ``(N, C, H, W)`` tensor permuted);
    tile matrices are ``(36, T, C)`` contiguous with ``T = N * ceil(H / 4) * ceil(W / 4)``,
    tile position ``6 * a + b`` = column index ``a``, row index ``b`` [Lavin & Gray Eq. 10].
    """

    def __init__(self, library: ctypes.CDLL):
        self._lib = library
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        for name in ("wg_input_transform", "wg_grad_output_transform", "wg_grad_input_transform"):
            getattr(library, name).argtypes = [ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
            getattr(library, name).restype = None
        library.wg_output_transform.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
        library.wg_output_transform.restype = None

    def input_transform(self, image: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out[6a+b] = (B^T d B)[b, a]`` of every 6x6 input tile ``d`` (zero-padded by one pixel);
        ``image`` of any strides (copied when not contiguous)."""
        image = image.contiguous()
        n, h, w, c = image.shape
        _check(image, (n, h, w, c), out, (36, _tiles(n, h, w), c))
        self._lib.wg_input_transform(image.data_ptr(), out.data_ptr(), n, h, w, c, _threads())
        return out

    def output_transform(self, m: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """``out`` = the 4x4 output tiles ``A^T m A`` (+ ``bias``), cropped to ``out``'s ``H, W``."""
        n, h, w, c = out.shape
        _check(m, (36, _tiles(n, h, w), c), out, (n, h, w, c))
        if bias is not None:
            _check(bias, (c,), bias, (c,))
        self._lib.wg_output_transform(
            m.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), n, h, w, c, _threads()
        )
        return out

    def grad_output_transform(self, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`output_transform`: ``out[6a+b] = (A g A^T)[b, a]`` per 4x4 tile ``g``
        (``grad`` of any strides)."""
        grad = grad.contiguous()
        n, h, w, c = grad.shape
        _check(grad, (n, h, w, c), out, (36, _tiles(n, h, w), c))
        self._lib.wg_grad_output_transform(grad.data_ptr(), out.data_ptr(), n, h, w, c, _threads())
        return out

    def grad_input_transform(self, dv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`input_transform`: ``B dV B^T`` per tile, overlap-added onto ``out``'s image."""
        n, h, w, c = out.shape
        _check(dv, (36, _tiles(n, h, w), c), out, (n, h, w, c))
        self._lib.wg_grad_input_transform(dv.data_ptr(), out.data_ptr(), n, h, w, c, _threads())
        return out


def _tiles(n: int, h: int, w: int) -> int:
    return n * -(-h // 4) * -(-w // 4)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _check(a: torch.Tensor, a_shape: Tuple[int, ...], b: torch.Tensor, b_shape: Tuple[int, ...]) -> None:
    for t, shape in ((a, a_shape), (b, b_shape)):
        if tuple(t.shape) != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(
                f"native Winograd transform: expected a contiguous float32 CPU tensor of {shape}, got "
                f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ', strided'}"
            )


def cache_dir() -> str:
    """Where compiled libraries are kept (see the module docstring)."""
    if os.environ.get("IMPROVED_DIFFUSION_CACHE"):
        return os.environ["IMPROVED_DIFFUSION_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "improved_diffusion")


def library() -> Optional[ctypes.CDLL]:
    """The compiled library, building it on the first call of the process; None where that fails (said in the log)."""
    with _LOCK:
        if "library" not in _LOADED:
            lib, reason = _build()
            if lib is None:
                logger.log(f"native kernels unavailable ({reason}); using torch ops")
            _LOADED["library"] = lib
        return _LOADED["library"]


def _checked(name: str, make: Callable[[ctypes.CDLL], Any], check: Callable[[Any], str]) -> Any:
    """``make(library())`` once per process if ``check`` of it returns "" (else None, said in the log)."""
    lib = library()
    with _LOCK:
        if name not in _LOADED:
            kernels = make(lib) if lib is not None else None
            # The check differentiates: whatever mode the first caller runs in (no_grad, inference, autocast).
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
                problem = check(kernels) if kernels is not None else ""
            if problem:
                logger.log(f"native {name} failed its self-check ({problem}); using torch ops")
                kernels = None
            _LOADED[name] = kernels
        return _LOADED[name]


def transforms(self_check: Callable[[NativeTransforms], str]) -> Optional[NativeTransforms]:
    """
    The compiled Winograd transforms, or None.

    :param self_check: compares them with the torch-ops ones on the first call; returns "" when
        they agree, else what differs (then they are not used).
    """
    return _checked("transforms", NativeTransforms, self_check)


def _compilers() -> List[str]:
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return [path for path in (shutil.which(name) for name in names) if path]


def _cpu_id() -> str:
    """This CPU's model and feature flags (a library built with -march=native runs only there)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
    except OSError:
        lines = []
    return platform.machine() + "".join(sorted(set(lines)))


def _build() -> Tuple[Optional[ctypes.CDLL], str]:
    compilers = _compilers()
    if not compilers:
        return None, "no C compiler found: set CC or install gcc"
    try:
        sources = []
        for path in SOURCES:
            with open(path, "rb") as f:
                sources.append(f.read())
    except OSError as exc:
        return None, f"cannot read {exc.filename}: {exc.strerror}"
    errors = []
    for compiler in compilers:
        for arch in _ARCH_FLAGS:
            try:
                return ctypes.CDLL(_compiled(compiler, (*_FLAGS, *arch), sources)), ""
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{os.path.basename(compiler)} {' '.join(arch)}: {str(exc).splitlines()[0][:200]}")
    return None, "; ".join(errors)


def _writable_folder() -> str:
    """:func:`cache_dir`, or this user's folder under the system's temporary one where that cannot be written."""
    fallback = os.path.join(tempfile.gettempdir(), f"improved_diffusion-{os.getuid() if hasattr(os, 'getuid') else 0}")
    for folder in (cache_dir(), fallback):
        try:
            os.makedirs(folder, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OSError(f"neither {cache_dir()} nor {fallback} can be written (set IMPROVED_DIFFUSION_CACHE)")


def _compiled(compiler: str, flags: Tuple[str, ...], sources: List[bytes]) -> str:
    """Path of the shared library built from ``sources``, compiling it unless the cache has it."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([*sources, " ".join(flags).encode(), version.encode(), _cpu_id().encode()]))
    folder = _writable_folder()
    path = os.path.join(folder, f"cpu_kernels-{key.hexdigest()[:20]}.so")
    if os.path.exists(path):
        return path
    fd, tmp = tempfile.mkstemp(prefix=".cpu_kernels-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        command = [compiler, *flags, "-o", tmp, *SOURCES, "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise subprocess.SubprocessError((result.stderr or result.stdout or "compiler failed").strip())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# ---------------------------------------------------------------------------------------------
# GroupNorm of channels-last images


def _gn_signatures(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.gn_forward.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_double, c_int]
    lib.gn_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, c_int]
    lib.gn_forward.restype = lib.gn_backward.restype = c_int
    return lib


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class _GroupNormChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups: int, weight, bias, eps: float, lib):
        n, c, h, w = x.shape
        image = x.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous for a channels-last x
        y = torch.empty_like(image)
        mean, rstd = (torch.empty((n, num_groups), dtype=x.dtype) for _ in range(2))
        args = (_ptr(image), _ptr(weight), _ptr(bias), _ptr(y), _ptr(mean), _ptr(rstd), n, h * w, c, num_groups)
        if lib.gn_forward(*args, eps, _threads()) != 0:
            raise MemoryError("native GroupNorm: out of memory")
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.num_groups, ctx.lib, ctx.has_bias = num_groups, lib, bias is not None
        return y.permute(0, 3, 1, 2)  # channels-last (N, C, H, W)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, mean, rstd, weight = ctx.saved_tensors
        n, c, h, w = x.shape
        grad = grad_out.permute(0, 2, 3, 1).contiguous()
        dx = torch.empty_like(grad)
        dgamma = torch.empty((n, c), dtype=x.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        dbeta = torch.empty((n, c), dtype=x.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        args = (_ptr(grad), _ptr(x.permute(0, 2, 3, 1)), _ptr(mean), _ptr(rstd), _ptr(weight), _ptr(dx))
        if ctx.lib.gn_backward(*args, _ptr(dgamma), _ptr(dbeta), n, h * w, c, ctx.num_groups, _threads()) != 0:
            raise MemoryError("native GroupNorm: out of memory")
        sums = [None if t is None else t.sum(0) for t in (dgamma, dbeta)]
        return dx.permute(0, 3, 1, 2), None, sums[0], sums[1], None, None


def group_norm_applies(x: torch.Tensor, num_groups: int) -> bool:
    """Whether :func:`group_norm` takes ``x``: a 4-d float32 CPU channels-last (not also NCHW) tensor
    outside autocast and ``torch.compile``."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == torch.float32
        and x.shape[1] % num_groups == 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def group_norm(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Optional[torch.Tensor]:
    """
    ``F.group_norm(x, num_groups, weight, bias, eps)`` [Wu & He 2018, Eq. 1-4] by the compiled
    kernel, differentiable in all three tensors, for an ``x`` that :func:`group_norm_applies` to.

    :return: the (N, C, H, W) channels-last result, or None where the kernel is unavailable.
    """
    lib = _checked("group_norm", _gn_signatures, _check_group_norm)
    if lib is None:
        return None
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    return _GroupNormChannelsLast.apply(x, num_groups, weight, bias, eps, lib)


def _check_group_norm(lib: ctypes.CDLL) -> str:
    """Forward and gradients on a small channels-last case against ``F.group_norm`` ("" when within 1e-5)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 12, 5, 3, generator=gen) * 3 + 1).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(12, generator=gen), torch.randn(12, generator=gen)
    grad = torch.randn(2, 12, 5, 3, generator=gen)  # never the global generator: a user's random stream stays
    results = []
    for fn in (lambda *a: _GroupNormChannelsLast.apply(*a, 1e-5, lib), lambda *a: F.group_norm(*a, eps=1e-5)):
        inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        out = fn(inputs[0], 4, inputs[1], inputs[2])
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    problems = []
    for name, theirs, reference in zip(("output", "grad x", "grad weight", "grad bias"), *results):
        error = (theirs - reference).abs().max().item() / (reference.abs().max().item() or 1.0)
        if not error <= 1e-5:
            problems.append(f"{name} off by {error:.1e}")
    return ", ".join(problems)
