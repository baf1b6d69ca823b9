"""
The Winograd tile transforms compiled from C (``csrc/winograd_transforms.c``), one memory pass
each, for the float32 CPU path of :mod:`improved_diffusion.winograd`.

The torch-ops transforms of that module gather tiles, transform rows, transform columns,
scatter and transpose in separate passes over multi-megabyte temporaries; the compiled ones
read each input once and write each output once (channels-last images in, the ``(36, T, C)``
matrices of the batched products out, and back), which is what makes the 64-channel layers
of a 32x32 model gain from Winograd on AVX-512 CPUs (benchmarks/README.md, "Compiled
transforms"). The batched matrix products stay with torch (MKL / oneDNN).

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``) for this CPU (``-O3 -march=native -fopenmp``) and kept in a cache folder
(``$IMPROVED_DIFFUSION_CACHE``, else ``$XDG_CACHE_HOME/improved_diffusion``, else
``~/.cache/improved_diffusion``) under a name that hashes the source, the compiler, its flags
and the CPU, written under a temporary name and renamed, so concurrent ranks never load a
half-written library. A small self-check against the torch-ops transforms runs before first
use (:func:`improved_diffusion.winograd.self_check`). Where no compiler works, or the check
fails, :func:`load` returns None, says why once in the log, and the torch-ops transforms are
used instead: same numbers within float32 rounding.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import logger

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "winograd_transforms.c")
_FLAGS = ("-O3", "-std=c99", "-ffp-contract=fast", "-shared", "-fPIC", "-pthread")
# Tried in this order: OpenMP (which then shares torch's OpenMP runtime and threads) for this
# CPU, then without OpenMP (POSIX threads), then for any CPU of the architecture.
_ARCH_FLAGS = (("-fopenmp", "-march=native"), ("-march=native",), ())

_LOCK = threading.Lock()
_LOADED: Dict[str, Optional["NativeTransforms"]] = {}  # a cache of the one library per process


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


def load(self_check: Callable[[NativeTransforms], str]) -> Optional[NativeTransforms]:
    """
    The compiled transforms, compiling them on the first call of the process; None where that fails.

    :param self_check: compares them with a reference on the first call; returns "" when they
        agree, else what differs (then they are not used).
    """
    with _LOCK:
        if SOURCE not in _LOADED:
            transforms, reason = _build_and_check(self_check)
            if transforms is None:
                logger.log(f"winograd: compiled transforms unavailable ({reason}); using torch ops")
            _LOADED[SOURCE] = transforms
        return _LOADED[SOURCE]


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


def _build_and_check(self_check: Callable[[NativeTransforms], str]) -> Tuple[Optional[NativeTransforms], str]:
    compilers = _compilers()
    if not compilers:
        return None, "no C compiler found: set CC or install gcc"
    try:
        with open(SOURCE, "rb") as f:
            source = f.read()
    except OSError as exc:
        return None, f"cannot read {SOURCE}: {exc}"
    errors = []
    for compiler in compilers:
        for arch in _ARCH_FLAGS:
            flags = (*_FLAGS, *arch)
            try:
                path = _compiled(compiler, flags, source)
                transforms = NativeTransforms(ctypes.CDLL(path))
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{os.path.basename(compiler)} {' '.join(arch)}: {str(exc).splitlines()[0][:200]}")
                continue
            problem = self_check(transforms)
            if problem:
                return None, f"self-check failed: {problem}"
            return transforms, ""
    return None, "; ".join(errors)


def _compiled(compiler: str, flags: Tuple[str, ...], source: bytes) -> str:
    """Path of the shared library built from ``source``, compiling it unless the cache has it."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_id().encode()]))
    folder = cache_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"winograd_transforms-{key.hexdigest()[:20]}.so")
    if os.path.exists(path):
        return path
    fd, tmp = tempfile.mkstemp(prefix=".winograd_transforms-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, "-o", tmp, SOURCE], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise subprocess.SubprocessError((result.stderr or result.stdout or "compiler failed").strip())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
