"""
The FID Inception-v3 feature network: the TensorFlow graph of 2015-12-05 that FID [Heusel et al.
2017], sFID [Nash et al. 2021], the Inception Score [Salimans et al. 2016] and improved precision
and recall [Kynkäänniemi et al. 2019] are computed with in the literature, written in PyTorch.

Its parameter names are those of the widely distributed PyTorch conversion of that graph,
``weights-inception-2015-12-05-6726825d.pth`` (566 entries, 23,885,392 numbers with the batch-norm statistics), which
:func:`load_inception` loads with ``strict=True`` from a path the user gives (``--inception_weights``
or the ``FID_INCEPTION_WEIGHTS`` environment variable). Nothing is downloaded.

What makes it the FID network rather than torchvision's Inception-v3:

- the input (uint8, any size) is resized to 299 x 299 by TensorFlow 1's bilinear resize
  (``align_corners=False`` without half-pixel centres, :func:`tf1_resize_bilinear`), then mapped by
  ``(x - 128) / 128``;
- the average pools inside the blocks do not count padded zeros, and the last block (``Mixed_7c``)
  pools its fourth branch with a 3x3 *max* pool;
- the classifier has 1008 outputs, and the Inception Score uses them without the bias
  (``logits_unbiased``), as the original Inception Score code multiplies ``pool_3`` by the
  softmax weight alone.

Taps (:meth:`InceptionV3FID.forward`): ``64`` and ``192`` (global averages after the two stem max
pools), ``768`` (after ``Mixed_6e``), ``2048`` (``pool_3``, the FID features), ``logits_unbiased``,
``logits``, and ``spatial`` (the sFID features: ``Mixed_6d.branch1x1`` after its batch norm and
ReLU, first 7 channels, (N, 7, 17, 17) — guided-diffusion's ``mixed_6/conv``).
"""

import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .fileio import safe_torch_load

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "FID_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
BN_EPS = 0.001


def tf1_resize_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """
    Resize as TensorFlow 1's ``resize_bilinear(align_corners=False)`` does: output pixel ``i`` reads
    source coordinate ``s = i * in_size / size`` (no half-pixel centres), interpolating between
    ``floor(s)`` and ``min(floor(s) + 1, in_size - 1)`` as ``a + (b - a) * (s - floor(s))``; along
    the width first, then the height. ``s`` is computed in float32 with a float32 scale, as TF1 does
    (computing it in float64 moves outputs by up to 1e-3 grey levels).

    :param x: (N, C, H, W) float32.
    :return: (N, C, size, size) float32.
    """
    x = _resize_last_axis(x, size)
    return _resize_last_axis(x.transpose(-1, -2), size).transpose(-1, -2)


def _resize_last_axis(x: torch.Tensor, size: int) -> torch.Tensor:
    in_size = x.shape[-1]
    # As TF1: the scale is a float32 number, the source coordinate float32 index * scale.
    scale = torch.tensor(in_size / size, dtype=torch.float32)
    source = torch.arange(size, dtype=torch.float32) * scale
    low = source.floor()
    weight = (source - low).to(x.device)
    low = low.long()
    high = (low + 1).clamp(max=in_size - 1)
    a, b = x[..., low.to(x.device)], x[..., high.to(x.device)]
    return a + (b - a) * weight


class BasicConv2d(nn.Module):
    """Convolution without bias -> batch norm (running statistics, eps 0.001) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs: object):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool, stride 1, padding 1, padded zeros not counted (the TF graph's pool branches)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_3x3_s2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)


def _chain(x: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class InceptionA(nn.Module):
    """``Mixed_5b/5c/5d``: 1x1; 1x1 -> 5x5; 1x1 -> 3x3 -> 3x3; average pool -> 1x1."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch1x1(x),
            _chain(x, [self.branch5x5_1, self.branch5x5_2]),
            _chain(x, [self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3]),
            self.branch_pool(_avg_pool_3x3(x)),
        ]
        return torch.cat(branches, dim=1)


class InceptionB(nn.Module):
    """``Mixed_6a`` (35 -> 17): 3x3 stride 2; 1x1 -> 3x3 -> 3x3 stride 2; 3x3 max pool stride 2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch3x3(x),
            _chain(x, [self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3]),
            _max_pool_3x3_s2(x),
        ]
        return torch.cat(branches, dim=1)


class InceptionC(nn.Module):
    """``Mixed_6b-6e``: 1x1; 1x1 -> 1x7 -> 7x1; 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7; average pool -> 1x1."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), dim=1)

    def branches(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four branch outputs, each (N, 192, 17, 17); the first is the sFID tap of ``Mixed_6d``."""
        return [
            self.branch1x1(x),
            _chain(x, [self.branch7x7_1, self.branch7x7_2, self.branch7x7_3]),
            _chain(
                x,
                [
                    self.branch7x7dbl_1,
                    self.branch7x7dbl_2,
                    self.branch7x7dbl_3,
                    self.branch7x7dbl_4,
                    self.branch7x7dbl_5,
                ],
            ),
            self.branch_pool(_avg_pool_3x3(x)),
        ]


class InceptionD(nn.Module):
    """``Mixed_7a`` (17 -> 8): 1x1 -> 3x3 stride 2; 1x1 -> 1x7 -> 7x1 -> 3x3 stride 2; max pool stride 2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            _chain(x, [self.branch3x3_1, self.branch3x3_2]),
            _chain(x, [self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4]),
            _max_pool_3x3_s2(x),
        ]
        return torch.cat(branches, dim=1)


class InceptionE(nn.Module):
    """
    ``Mixed_7b`` / ``Mixed_7c``: 1x1; 1x1 -> [1x3, 3x1]; 1x1 -> 3x3 -> [1x3, 3x1]; pool -> 1x1.
    The pool is a 3x3 average pool (padding not counted) in ``Mixed_7b`` and a 3x3 *max* pool,
    stride 1, padding 1, in ``Mixed_7c`` (``max_pool=True``), as in the TF graph.
    """

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_3x3(x)
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(b3),
            self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl),
            self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(pooled),
        ]
        return torch.cat(branches, dim=1)


class InceptionV3FID(nn.Module):
    """The TF 2015-12-05 Inception-v3 graph with the distributed conversion's parameter names."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """
        :param images: (N, 3, H, W) uint8 (grey images repeated to 3 channels), any H and W.
        :return: (N, 3, 299, 299) float32 in about [-1, 1]: TF1 bilinear resize, then ``(x - 128) / 128``.
        """
        return (tf1_resize_bilinear(images.float()) - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        :param images: (N, 3, H, W) uint8, any H and W.
        :return: dict of float32 taps: ``64`` (N, 64), ``192`` (N, 192), ``768`` (N, 768), ``2048``
            (N, 2048), ``logits_unbiased`` and ``logits`` (N, 1008), ``spatial`` (N, 7, 17, 17).
        """
        x = self.preprocess(images)
        taps = {}
        x = _chain(x, [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3])
        x = _max_pool_3x3_s2(x)
        taps["64"] = x.mean(dim=(2, 3))
        x = _max_pool_3x3_s2(_chain(x, [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3]))
        taps["192"] = x.mean(dim=(2, 3))
        x = _chain(x, [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c])
        branches = self.Mixed_6d.branches(x)
        taps["spatial"] = branches[0][:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)
        x = self.Mixed_6e(torch.cat(branches, dim=1))
        taps["768"] = x.mean(dim=(2, 3))
        x = _chain(x, [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c])
        pool = x.mean(dim=(2, 3))  # (N, 2048): pool_3
        taps["2048"] = pool
        taps["logits_unbiased"] = pool @ self.fc.weight.T
        taps["logits"] = taps["logits_unbiased"] + self.fc.bias
        return taps

    def evaluation_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        The features the statistics use (see ``eval_features``).

        :param images: (N, 3, H, W) uint8.
        :return: ``pool`` (N, 2048), ``logits`` (N, 1008, no bias: Inception Score), ``spatial`` (N, 2023).
        """
        taps = self(images)
        return {
            "pool": taps["2048"],
            "logits": taps["logits_unbiased"],
            "spatial": taps["spatial"].flatten(1),
        }


def inception_weights_path(flag_value: str = "") -> str:
    """
    The weights file to use: ``--inception_weights`` when given, else ``$FID_INCEPTION_WEIGHTS``.

    :raises UserError: in one line naming the file needed, when neither is set or the file is missing.
    """
    path = flag_value or os.environ.get(WEIGHTS_ENV, "")
    help_text = (
        f"the FID Inception-v3 weights {WEIGHTS_FILE} (the PyTorch conversion of TensorFlow's "
        "2015-12-05 graph) are needed and nothing is downloaded: copy the file from any machine that has it "
        f"and pass --inception_weights PATH or set {WEIGHTS_ENV}"
    )
    if not path:
        raise UserError(f"no Inception weights given: {help_text}")
    if not os.path.isfile(path):
        source = "--inception_weights" if flag_value else WEIGHTS_ENV
        raise UserError(f"{source} {path}: no such file; {help_text}")
    return path


def load_inception(path: str, device: Optional[torch.device] = None) -> InceptionV3FID:
    """
    Build the network and load ``path`` strictly, in eval mode (batch norm uses running statistics).

    :raises UserError: naming the file and the missing, unexpected or mis-shaped keys when it is
        not the FID Inception weights.
    """
    model = InceptionV3FID()
    state = safe_torch_load(path)
    if not isinstance(state, dict):
        raise UserError(f"--inception_weights {path} holds a {type(state).__name__}, not a state dict ({WEIGHTS_FILE})")
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.eval().to(device or "cpu")  # eval: batch norm must use the running statistics


def check_state_dict(model: nn.Module, state: dict, path: str) -> None:
    """Raise a one-line UserError naming what differs between ``state`` and ``model``'s keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(getattr(state[k], 'shape', ()))} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and (not torch.is_tensor(state[k]) or state[k].shape != v.shape)
    ]
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{more})")
    if problems:
        raise UserError(f"{path} is not the FID Inception weights {WEIGHTS_FILE}: {'; '.join(problems)}")
