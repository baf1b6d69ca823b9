"""
Winograd F(4x4, 3x3) convolution: the UNet's 3x3, stride-1, padding-1 convolutions with 4x
fewer multiplications, for float32 on CPUs [Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks", §4].

A direct 3x3 convolution spends 9 multiply-adds per output pixel, input channel and output
channel. Winograd's minimal filtering algorithm computes a 4x4 output tile from a 6x6 input
tile with 36 element-wise products per channel pair instead of 144:

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A        [Lavin & Gray Eq. 10]

with ``d`` a 6x6 input tile, ``g`` the 3x3 filter and the constant matrices ``B^T`` (6x6),
``G`` (6x3), ``A^T`` (4x6) below (interpolation points 0, ±1, ±2, ∞). Summing over input
channels turns the element-wise products into 36 independent matrix products, one per tile
position (torch's ``bmm``). The backward pass is the transpose of each linear stage: the same
36 matrix products give the weight and input gradients, so training gets the 4x saving too.

The tile transforms (gathering 6x6 tiles and applying ``B^T``, ``A^T`` and their adjoints) do
few operations per byte, so their cost is memory traffic: in torch ops
(:class:`TorchTransforms`) each takes several passes over multi-megabyte temporaries; compiled
from C (:mod:`improved_diffusion.native`, the default where a C compiler works) each
is one pass, which is what makes 64-channel layers gain (benchmarks/README.md).

Layout: everything runs channels-last (``N, H, W, C`` in memory), where the tile gathering and
scattering copy contiguous channel vectors; the output is a channels-last ``(N, O, H, W)``
tensor, which the following layers keep.

Memory: training keeps each convolution's transformed input (2.25x its input) for the weight
gradient instead of the input itself, and every thread keeps one scratch buffer per temporary,
sized for the largest layer seen (:func:`release_workspace` frees them).

Accuracy: the transforms' constants (up to 8 and 1/24) cost a few bits, so the result differs
from the direct convolution by about 1e-5 of the output's scale in float32 (checked by
``tests/test_winograd.py``), far below bfloat16 or TF32 rounding. A network uses this path
where its ``winograd`` speed setting is on (:class:`~improved_diffusion.nn.SpeedSettings`, the
default); switching it off gives the direct convolution.
"""

import json
import math
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native as native_kernels
from .errors import UserError
from .fileio import atomic_write

# Tile sizes of F(4x4, 3x3): 4x4 outputs from 6x6 inputs.
OUT_TILE = 4
IN_TILE = OUT_TILE + 2

# [Lavin & Gray §4.2] F(4, 3), interpolation points 0, 1, -1, 2, -2 and infinity.
_BT = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
_G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
_AT = (
    (1, 1, 1, 1, 1, 0),
    (0, 1, -1, 2, -2, 0),
    (0, 1, 1, 4, 4, 0),
    (0, 1, -1, 8, -8, 1),
)

# Where the transforms pay off on the CPUs measured (benchmarks/README.md, "Winograd"): feature
# maps of at least MIN_SIZE pixels a side, at least MIN_CHANNELS input and output channels (with
# fewer, the transforms cost more than the 4x fewer multiplications save), and maps that fill
# at least MIN_TILE_USE of their 4x4 tiles (a 10x10 map computes 12x12 and gains nothing).
MIN_SIZE = 8
MIN_CHANNELS = 64
MIN_TILE_USE = 0.8

_MATRICES: dict = {}


def _matrices(like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    ``B^T`` (6, 6), ``A^T`` (4, 6) and ``G ⊗ G`` (36, 9) with the device and dtype of ``like``,
    cached. The rows of ``G ⊗ G`` are tile positions in [column, row] order (``6 a + b``), its
    columns filter taps in the filter's own [row, column] order (``3 r + s``), so it applies to
    ``weight.reshape(O * C, 9)`` without a copy: ``(G ⊗ G)[6a+b, 3r+s] = G[a, s] G[b, r]``.
    """
    key = (like.device, like.dtype)
    if key not in _MATRICES:
        g = torch.tensor(_G, dtype=torch.float64)
        gg = torch.kron(g, g).view(IN_TILE**2, 3, 3).transpose(1, 2).reshape(IN_TILE**2, 9)
        _MATRICES[key] = tuple(
            m.to(device=like.device, dtype=like.dtype).contiguous()
            for m in (torch.tensor(_BT, dtype=torch.float64), torch.tensor(_AT, dtype=torch.float64), gg)
        )
    return _MATRICES[key]


class _Workspace(threading.local):
    """
    Per-thread scratch buffers for the temporaries of one convolution call, reused across
    calls: fresh multi-megabyte allocations cost more in page faults than the transforms
    themselves (benchmarks/README.md has the measurement).
    Each slot holds one temporary; nothing returned to the caller or saved for the backward pass
    lives in a slot. Thread-local, so concurrent calls from several threads never share one.
    """

    def __init__(self) -> None:
        self.buffers: Dict[Tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, slot: int, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous uninitialised tensor of ``shape`` in slot ``slot``, dtype/device of ``like``."""
        key, numel = (slot, like.dtype, like.device), math.prod(shape)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are kept between calls for speed)."""
    _WORKSPACE.buffers.clear()


def _two_sided(left: torch.Tensor, tiles: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """
    Apply ``left`` to both tile axes, swapping them: ``out[j, i] = sum_kl left[i, k] tiles[k, l] left[j, l]``.

    Two broadcast matrix products (one per axis) instead of one (p, q) @ (q, q * rest) product,
    which is several times slower on CPUs for these skinny shapes.

    :param left: (p, q) transform matrix.
    :param tiles: (q, q, rest) tensor, tile axes first.
    :param out: where to write the result (default: a new tensor); the intermediate goes to
        workspace slot 0.
    :return: (p, p, rest), contiguous, axes in swapped order.
    """
    p, q = left.shape
    rest = tiles.shape[2]
    second = torch.matmul(left, tiles, out=_WORKSPACE.get(0, (q, p, rest), tiles))  # the second axis
    if out is None:
        out = torch.empty((p, p, rest), dtype=tiles.dtype, device=tiles.device)
    return torch.matmul(left, second.permute(1, 0, 2), out=out)  # (p, p, rest): then the first


def worthwhile(in_channels: int, out_channels: int, height: int, width: int) -> bool:
    """
    Whether a 3x3 convolution of this size gains from Winograd on a CPU: at least
    ``MIN_CHANNELS`` input and output channels and a feature map of at least ``MIN_SIZE``
    pixels a side that fills at least ``MIN_TILE_USE`` of its 4x4 tiles.
    """
    tiled_area = OUT_TILE**2 * -(-height // OUT_TILE) * -(-width // OUT_TILE)
    return (
        min(in_channels, out_channels) >= MIN_CHANNELS
        and min(height, width) >= MIN_SIZE
        and height * width >= MIN_TILE_USE * tiled_area
    )


def fast_input(x: torch.Tensor) -> bool:
    """A 4-d float32 CPU tensor outside autocast and ``torch.compile``."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def eligible(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """
    Whether ``conv(x)`` can take the Winograd path: a float32 CPU input outside autocast and
    compilation, a float32 3x3 kernel with stride 1, padding 1, no dilation or groups, zero
    padding.
    """
    return (
        fast_input(x)
        and conv.weight.dtype == torch.float32
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def applicable(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` takes the Winograd path by the fixed rule: :func:`eligible` and :func:`worthwhile`."""
    return eligible(conv, x) and worthwhile(conv.in_channels, conv.out_channels, *x.shape[-2:])


class TorchTransforms:
    """
    The tile transforms of Winograd F(4x4, 3x3) in torch ops (gathers, two small matrix
    products per transform, scatters), for any dtype and device; the reference for the compiled
    ones (:class:`improved_diffusion.native.NativeTransforms`), with the same methods.

    Images are ``(N, H, W, C)`` (any strides: a channels-last ``(N, C, H, W)`` tensor permuted);
    tile matrices ``(36, T, C)``, ``T = N * rows * cols`` tiles in ``(n, row, column)`` order,
    position ``6 a + b`` = column index ``a``, row index ``b``. Temporaries live in workspace slots
    0-2 and 4-6 (the caller's products use slots 3 and 4 between the calls).
    """

    def input_transform(self, image: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out[6a+b] = (B^T d B)[b, a]`` of every 6x6 input tile ``d`` (one pixel of zero padding)."""
        n, height, width, c = image.shape
        rows, cols = -(-height // OUT_TILE), -(-width // OUT_TILE)
        # Zero-pad to whole tiles: one pixel of convolution padding on each side, plus the
        # bottom/right remainder.
        padded = _WORKSPACE.get(1, (n, OUT_TILE * rows + 2, OUT_TILE * cols + 2, c), image)
        padded[:, :1].zero_()
        padded[:, height + 1 :].zero_()
        padded[:, 1 : height + 1, :1].zero_()
        padded[:, 1 : height + 1, width + 1 :].zero_()
        padded[:, 1 : height + 1, 1 : width + 1] = image
        d = _WORKSPACE.get(2, (IN_TILE, IN_TILE, n, rows, cols, c), image)  # [row, column]
        d.copy_(padded.unfold(1, IN_TILE, OUT_TILE).unfold(2, IN_TILE, OUT_TILE).permute(4, 5, 0, 1, 2, 3))
        _two_sided(_matrices(image)[0], d.view(IN_TILE, IN_TILE, -1), out=out.view(IN_TILE, IN_TILE, -1))
        return out

    def output_transform(self, m: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """``out`` = the 4x4 output tiles ``A^T m A`` (+ ``bias``), cropped to ``out``'s ``H, W``."""
        n, height, width, o = out.shape
        rows, cols = -(-height // OUT_TILE), -(-width // OUT_TILE)
        y = _WORKSPACE.get(5, (OUT_TILE, OUT_TILE, m.shape[1] * o), m)
        _two_sided(_matrices(m)[1], m.view(IN_TILE, IN_TILE, -1), out=y)  # A^T m A, [row, column]
        y = y.view(OUT_TILE, OUT_TILE, n, rows, cols, o).permute(2, 3, 0, 4, 1, 5)
        if (OUT_TILE * rows, OUT_TILE * cols) == (height, width):
            out.view(n, rows, OUT_TILE, cols, OUT_TILE, o).copy_(y)
        else:
            out.copy_(y.reshape(n, OUT_TILE * rows, OUT_TILE * cols, o)[:, :height, :width])
        if bias is not None:
            out += bias
        return out

    def grad_output_transform(self, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`output_transform`: ``out[6a+b] = (A g A^T)[b, a]`` per 4x4 tile ``g``."""
        n, height, width, o = grad.shape
        rows, cols = -(-height // OUT_TILE), -(-width // OUT_TILE)
        if (OUT_TILE * rows, OUT_TILE * cols) != (height, width):
            grad = F.pad(grad, (0, 0, 0, OUT_TILE * cols - width, 0, OUT_TILE * rows - height))
        tiled = _WORKSPACE.get(1, (OUT_TILE, OUT_TILE, n, rows, cols, o), grad)
        tiled.copy_(grad.reshape(n, rows, OUT_TILE, cols, OUT_TILE, o).permute(2, 4, 0, 1, 3, 5))
        _two_sided(_matrices(grad)[1].t(), tiled.view(OUT_TILE, OUT_TILE, -1), out=out.view(IN_TILE, IN_TILE, -1))
        return out

    def grad_input_transform(self, dv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`input_transform`: ``B dV B^T`` per tile, overlap-added onto ``out``'s image."""
        n, height, width, c = out.shape
        rows, cols = -(-height // OUT_TILE), -(-width // OUT_TILE)
        dd = _WORKSPACE.get(4, (IN_TILE, IN_TILE, n * rows * cols * c), dv)
        _two_sided(_matrices(dv)[0].t(), dv.view(IN_TILE, IN_TILE, -1), out=dd)  # B dV B^T, [row, column]
        out.copy_(_overlap_add(dd.view(IN_TILE, IN_TILE, n, rows, cols, c))[:, 1 : height + 1, 1 : width + 1])
        return out


TORCH_TRANSFORMS = TorchTransforms()


def transforms_for(x: torch.Tensor, native: bool = True) -> Any:
    """The compiled transforms for a float32 CPU ``x`` when ``native`` and they load, else the torch-ops ones."""
    if native and x.dtype == torch.float32 and x.device.type == "cpu":
        compiled = native_kernels.transforms(self_check)
        if compiled is not None:
            return compiled
    return TORCH_TRANSFORMS


class _WinogradConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], keep_input: bool, transforms: Any
    ) -> torch.Tensor:
        n, c, height, width = x.shape
        out_channels = weight.shape[0]
        tiles = n * -(-height // OUT_TILE) * -(-width // OUT_TILE)
        # B^T d B, (36, T, C), [column, row]: a new tensor when the weight gradient needs it.
        shape = (IN_TILE**2, tiles, c)
        v = torch.empty(shape, dtype=x.dtype, device=x.device) if keep_input else _WORKSPACE.get(3, shape, x)
        transforms.input_transform(x.permute(0, 2, 3, 1), v)
        # G g G^T in the same [column, row] order, (36, O, C): one product with the filters as
        # they lie in memory, (O * C, 9); the batched product takes its transpose (36, C, O).
        gg = _matrices(x)[2]
        u = (gg @ weight.reshape(out_channels * c, 9).t()).view(IN_TILE**2, out_channels, c)
        m = _WORKSPACE.get(4, (IN_TILE**2, tiles, out_channels), x)
        torch.bmm(v, u.transpose(1, 2), out=m)  # one matrix product per tile position
        y = torch.empty((n, height, width, out_channels), dtype=x.dtype, device=x.device)
        transforms.output_transform(m, bias, y)
        ctx.save_for_backward(v if keep_input else None, u)
        ctx.transforms, ctx.has_bias = transforms, bias is not None
        return y.permute(0, 3, 1, 2)  # channels-last (N, O, H, W)

    @staticmethod
    @once_differentiable  # the saved transforms carry no graph: double backward would be wrong
    def backward(ctx, grad_out: torch.Tensor):
        v, u = ctx.saved_tensors
        gg = _matrices(grad_out)[2]
        n, out_channels, height, width = grad_out.shape
        c, tiles = u.shape[2], n * -(-height // OUT_TILE) * -(-width // OUT_TILE)
        dm = ctx.transforms.grad_output_transform(
            grad_out.permute(0, 2, 3, 1), _WORKSPACE.get(2, (IN_TILE**2, tiles, out_channels), grad_out)
        )  # A dY A^T, (36, T, O), [column, row]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            du = torch.bmm(dm.transpose(1, 2), v)  # (36, O, C)
            grad_w = (du.view(IN_TILE**2, out_channels * c).t() @ gg).view(out_channels, c, 3, 3)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3))
        if ctx.needs_input_grad[0]:
            dv = _WORKSPACE.get(3, (IN_TILE**2, tiles, c), grad_out)
            torch.bmm(dm, u, out=dv)  # (36, T, C)
            grad_x = torch.empty((n, height, width, c), dtype=grad_out.dtype, device=grad_out.device)
            grad_x = ctx.transforms.grad_input_transform(dv, grad_x).permute(0, 3, 1, 2)
        return grad_x, grad_w, grad_b, None, None


def _overlap_add(dd: torch.Tensor) -> torch.Tensor:
    """
    Scatter-add 6x6 tile gradients back onto the padded image (tiles overlap by 2 pixels).

    :param dd: (6, 6, N, rows, cols, C) gradient of every tile pixel.
    :return: (N, 4 rows + 4, 4 cols + 4, C) gradient of the padded input (the last two rows
        and columns are beyond the padding and get nothing).
    """
    _, _, n, rows, cols, c = dd.shape
    # Columns: offsets 0-3 land in the tile's own 4 columns, offsets 4-5 in the next tile's.
    by_cols = _WORKSPACE.get(5, (IN_TILE, n, rows, cols + 1, OUT_TILE, c), dd)
    by_cols[:, :, :, cols:].zero_()
    by_cols[:, :, :, :cols] = dd[:, :OUT_TILE].permute(0, 2, 3, 4, 1, 5)
    by_cols[:, :, :, 1:, :2] += dd[:, OUT_TILE:].permute(0, 2, 3, 4, 1, 5)
    # Rows, the same way.
    out = _WORKSPACE.get(6, (n, rows + 1, OUT_TILE, cols + 1, OUT_TILE, c), dd)
    out[:, rows:].zero_()
    out[:, :rows] = by_cols[:OUT_TILE].permute(1, 2, 0, 3, 4, 5)
    out[:, 1:, :2] += by_cols[OUT_TILE:].permute(1, 2, 0, 3, 4, 5)
    return out.view(n, OUT_TILE * (rows + 1), OUT_TILE * (cols + 1), c)


def conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, native: bool = True
) -> torch.Tensor:
    """
    ``F.conv2d(x, weight, bias, padding=1)`` by Winograd F(4x4, 3x3) [Lavin & Gray Eq. 10],
    differentiable in ``x``, ``weight`` and ``bias``.

    :param x: (N, C, H, W), any memory layout (float32 is the fast case; float64 works too).
    :param weight: (O, C, 3, 3), same dtype.
    :param bias: (O,) or None.
    :param native: take the compiled tile transforms (:mod:`improved_diffusion.native`)
        where they load; False: the torch-ops ones. Same numbers within float32 rounding.
    :return: (N, O, H, W) in channels-last memory layout.
    """
    keep_input = torch.is_grad_enabled() and weight.requires_grad  # the weight gradient needs B^T d B
    return _WinogradConv3x3.apply(x, weight, bias, keep_input, transforms_for(x, native))


def self_check(transforms: Any) -> str:
    """
    Compare each transform of ``transforms`` with :class:`TorchTransforms` on a small odd-sized
    case (:func:`transform_pairs`).

    :return: "" when they agree to 1e-5 of the reference's largest value, else what differs.
    """
    problems = []
    for name, (theirs, reference) in transform_pairs(transforms, torch.Generator().manual_seed(0)).items():
        error = (theirs - reference).abs().max().item() / (reference.abs().max().item() or 1.0)
        if not error <= 1e-5:  # also catches NaN
            problems.append(f"{name} off by {error:.1e}")
    return ", ".join(problems)


def transform_pairs(transforms: Any, generator: torch.Generator) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """
    Each transform of ``transforms`` and of :class:`TorchTransforms` on the same small random
    float32 inputs (two images of 6x9 pixels and 70 channels: partial tiles, a channel count
    off the compiled code's blocks), ``{name: (theirs, torch ops')}``: for self-checks and tests.
    """
    n, height, width, c = 2, 6, 9, 70
    tiles = n * -(-height // OUT_TILE) * -(-width // OUT_TILE)
    image = torch.randn((n, height, width, c), generator=generator)
    matrices = torch.randn((IN_TILE**2, tiles, c), generator=generator)
    bias = torch.randn((c,), generator=generator)
    pairs = {}
    for name, args, shape in (
        ("input_transform", (image,), matrices.shape),
        ("output_transform", (matrices, bias), image.shape),
        ("grad_output_transform", (image,), matrices.shape),
        ("grad_input_transform", (matrices,), image.shape),
    ):
        results = [
            getattr(t, name)(*[a.clone() for a in args], torch.full(shape, float("nan")))
            for t in (transforms, TORCH_TRANSFORMS)
        ]
        pairs[name] = (results[0], results[1])
    return pairs


# ---------------------------------------------------------------------------------------------
# Choosing the path by measurement


class PathChooser:
    """
    Chooses, per convolution shape, between the direct and the Winograd convolution by timing
    both, as cuDNN's benchmark mode does: on the first call with a new key (channels, input
    shape, memory layout, training or not, thread count) it times each path a few times
    (forward, plus backward when training) on tensors of that shape and keeps the faster; the
    Winograd path must win by ``margin`` so that noise never picks a slower path. Decisions are
    kept for the process and, with ``cache_file``, in a JSON file reused by later runs on the
    same CPU and torch version. The timing draws no random numbers.

    One chooser serves one model (:func:`improved_diffusion.nn.apply_speed` makes it), so two
    models in a process never share decisions.

    :param cache_file: JSON file of earlier decisions ("" or None: this process only).
    :param repeats: timed calls per path (the fastest counts), alternating between the paths,
        after one warm-up call of each.
    :param margin: Winograd is chosen only if it takes at most this fraction of the direct time.
    :param native: time (and key the decisions by) the Winograd path with the compiled tile
        transforms where they load (:func:`conv3x3`'s ``native``).
    """

    def __init__(self, cache_file: Optional[str] = None, repeats: int = 5, margin: float = 0.95, native: bool = True):
        self.cache_file, self.repeats, self.margin, self.native = cache_file or None, repeats, margin, native
        self.decisions: Dict[str, Dict[str, Any]] = {}
        self._new: List[str] = []
        if self.cache_file and os.path.exists(self.cache_file):
            self.decisions.update(_read_cache(self.cache_file))

    def use_winograd(self, in_channels: int, out_channels: int, x: torch.Tensor, training: bool) -> bool:
        """Whether a 3x3 convolution ``in_channels -> out_channels`` of ``x`` should use Winograd."""
        key = _key(in_channels, out_channels, x, training, transforms_for(x, self.native))
        if key not in self.decisions:
            self.decisions[key] = _measure(
                in_channels, out_channels, x, training, self.repeats, self.margin, self.native
            )
            self._new.append(key)
            if self.cache_file:
                _write_cache(self.cache_file, self.decisions)
        return bool(self.decisions[key]["winograd"])

    def report(self) -> List[str]:
        """One line per decision made since the last call, e.g. for the training log."""
        lines = [f"conv path {k}: {_describe(self.decisions[k])}" for k in self._new]
        self._new = []
        return lines


def _key(in_channels: int, out_channels: int, x: torch.Tensor, training: bool, transforms: Any) -> str:
    layout = "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    n, _, height, width = x.shape
    mode = "train" if training else "eval"
    kind = "torch-ops" if transforms is TORCH_TRANSFORMS else "compiled"
    return (
        f"{in_channels}->{out_channels} {height}x{width} batch {n} {layout} {mode} threads {torch.get_num_threads()} "
        f"cpu {torch.backends.cpu.get_cpu_capability()} torch {torch.__version__} {kind} transforms"
    )


def _describe(decision: Dict[str, Any]) -> str:
    path = "winograd" if decision["winograd"] else "direct"
    return f"{path} (direct {1e3 * decision['direct_s']:.2f} ms, winograd {1e3 * decision['winograd_s']:.2f} ms)"


def _measure(
    in_channels: int, out_channels: int, x: torch.Tensor, training: bool, repeats: int, margin: float, native: bool
):
    """Time both paths on constant tensors shaped like ``x`` (no random numbers are drawn)."""
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    probe = torch.full(x.shape, 0.5, dtype=x.dtype).contiguous(memory_format=layout)
    weight = torch.full((out_channels, in_channels, 3, 3), 0.01, dtype=x.dtype)
    bias = torch.zeros(out_channels, dtype=x.dtype)

    def run(conv: Any) -> None:
        if not training:
            with torch.no_grad():
                conv(probe, weight, bias)
            return
        # Own saved-tensor hooks: inside a gradient-checkpointed block the probe's tensors must
        # not join the block's saved tensors (the recomputation would not see them again).
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            inputs = [t.detach().requires_grad_(True) for t in (probe, weight, bias)]
            conv(*inputs).sum().backward()

    times = _fastest_interleaved(
        {
            "direct_s": lambda: run(lambda a, w, b: F.conv2d(a, w, b, padding=1)),
            "winograd_s": lambda: run(lambda a, w, b: conv3x3(a, w, b, native=native)),
        },
        repeats,
    )
    return {"winograd": times["winograd_s"] <= margin * times["direct_s"], **times}


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _fastest_interleaved(calls: Dict[str, Any], repeats: int) -> Dict[str, float]:
    """
    The fastest of ``repeats`` timed rounds of each call, after one warm-up round (workspaces,
    kernels). Rounds alternate between the calls, so a slow moment of a shared machine (another
    process, page faults while the heap grows) does not fall on one path only.
    """
    for fn in calls.values():
        fn()
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _read_cache(path: str) -> Dict[str, Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"--winograd_cache {path}: not a readable JSON file of convolution timings ({exc})") from exc
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise UserError(f"--winograd_cache {path}: no 'entries' table; delete the file to measure afresh")
    return entries


def _write_cache(path: str, decisions: Dict[str, Dict[str, Any]]) -> None:
    text = json.dumps({"version": 1, "entries": decisions}, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
