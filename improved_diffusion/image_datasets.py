"""
Training images from a folder: an endless, resumable stream of batches in ``[-1, 1]``.

Files are found recursively (jpg, jpeg, png, gif, any case) and sorted; with class
conditioning a file's class is its name before the first ``_`` and the sorted class names are
numbered from 0. Rank ``r`` of ``n`` takes files ``r, r + n, r + 2n, ...``. Each image is
converted to RGB, halved with a box filter while its shorter side is at least twice the target,
scaled with bicubic resampling so the shorter side equals the target, centre-cropped and mapped
to ``x / 127.5 - 1`` (the original's preprocessing, [IDDPM §4]). With ``random_crop`` (guided-
diffusion's augmentation [ADM]) the shorter side is first resized to a random length in
[S, ceil(S / 0.8)] and a random S x S square is cut out.

Unlike the original's endless ``DataLoader`` loop, the order is a seeded permutation per epoch
and the loader has a position (``state_dict`` / ``load_state_dict``), so a resumed training run
sees exactly the batches an uninterrupted one would. Batches run across epoch boundaries, so a
shard smaller than the batch still works. Worker processes (``num_workers``) decode ahead of
the training loop; a bad file still gives a one-line :class:`UserError` naming it.
"""

import atexit
import math
import os
import signal
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import blobfile as bf
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import dist_util
from .errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")

Batch = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


# PIL modes by number of channels (--image_channels).
IMAGE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def check_enough_images(data_dir: str, num_images: int, world_size: int) -> None:
    """A UserError when the data folder has fewer images than processes (each needs one)."""
    if num_images < world_size:
        raise UserError(
            f"--data_dir {data_dir} has {num_images} image(s), fewer than the {world_size} "
            "processes; every process needs at least one image"
        )


def load_data(
    *,
    data_dir: str,
    batch_size: int,
    image_size: int,
    class_cond: bool = False,
    deterministic: bool = False,
    random_flip: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    random_crop: bool = False,
    image_channels: int = 3,
) -> "ImageLoader":
    """
    An endless iterator over ``(images, model_kwargs)`` batches of this rank's shard.

    :param data_dir: folder searched recursively for images (local path or blobfile URL).
    :param batch_size: images per batch (per process).
    :param image_size: side of the square training images.
    :param class_cond: if True, ``model_kwargs`` holds ``"y"``: (N,) int64 class labels.
    :param deterministic: if True, files come in sorted order every epoch (no shuffling).
    :param random_flip: if True, mirror each image left-right with probability 1/2.
    :param random_crop: if True, a random crop of a randomly resized image (:func:`random_crop_arr`)
        instead of the centre crop.
    :param num_workers: decoding worker processes (0 = decode in this process).
    :param seed: seed of the per-epoch shuffling, flipping and cropping.
    :param rank: this process's rank; default ``dist_util.get_rank()``.
    :param world_size: number of processes; default ``dist_util.get_world_size()``.
    :param image_channels: channels C of the images (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA);
        every file is converted to that mode (a colour image becomes grey for C = 1).
    :return: an :class:`ImageLoader`; ``next()`` gives (N, C, image_size, image_size) float32
        images in ``[-1, 1]`` and a dict (``{"y": labels}`` or ``{}``).
    """
    mode = image_mode(image_channels)
    if rank is None or world_size is None:
        rank = dist_util.get_rank() if rank is None else rank
        world_size = dist_util.get_world_size() if world_size is None else world_size
    for name, value in (("batch_size", batch_size), ("image_size", image_size)):
        if value <= 0:
            raise UserError(f"--{name} {value}: must be a positive integer")
    if num_workers < 0:
        raise UserError(f"--num_workers {num_workers}: must be 0 or more")
    all_files = list_image_files(data_dir)
    labels = class_labels(all_files) if class_cond else None
    check_enough_images(data_dir, len(all_files), world_size)
    dataset = ImageDataset(
        image_size,
        all_files[rank::world_size],
        classes=None if labels is None else labels[rank::world_size],
        random_crop=random_crop,
        mode=mode,
    )
    return ImageLoader(
        dataset,
        batch_size,
        shuffle=not deterministic,
        random_flip=random_flip,
        seed=seed,
        num_workers=num_workers,
    )


def list_image_files(data_dir: str, flag: str = "data_dir") -> List[str]:
    """
    Every image file under ``data_dir``, depth first, entries of each folder sorted by name.

    :param flag: the flag named in errors (e.g. ``"val_data_dir"``).
    :raises UserError: if the folder is missing, not a folder, or holds no image files.
    """
    if not data_dir:
        raise UserError(f"--{flag} is empty: pass the folder holding the training images")
    if not bf.exists(data_dir):
        raise UserError(f"--{flag} {data_dir}: no such folder")
    if not bf.isdir(data_dir):
        raise UserError(f"--{flag} {data_dir}: not a folder")
    files = _list_recursively(bf, data_dir)
    if not files:
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise UserError(f"--{flag} {data_dir}: no image files ({exts}) found, searched recursively")
    return files


def _list_recursively(bf: Any, folder: str) -> List[str]:
    found = []
    for entry in sorted(bf.listdir(folder)):
        path = bf.join(folder, entry)
        ext = entry.rsplit(".", 1)[-1].lower()
        if "." in entry and ext in IMAGE_EXTENSIONS:
            found.append(path)
        elif bf.isdir(path):
            found.extend(_list_recursively(bf, path))
    return found


def class_names(paths: Sequence[str]) -> List[str]:
    """
    The class name of each file: its name before the first ``_``.

    :raises UserError: if a file name has no ``_``.
    """
    names = []
    for path in paths:
        base = os.path.basename(path.rstrip("/"))
        if "_" not in base:
            raise UserError(f"--class_cond needs file names like <class>_<anything>.png, but {path} has no '_'")
        names.append(base.split("_")[0])
    return names


def class_labels(paths: Sequence[str]) -> List[int]:
    """
    Class index of each file: its name before the first ``_`` (:func:`class_names`), sorted
    names numbered from 0.

    :raises UserError: if a file name has no ``_``.
    """
    names = class_names(paths)
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return [index[name] for name in names]


def check_class_count(data_dir: str, paths: Sequence[str], num_classes: int, flag: str = "num_classes") -> None:
    """A UserError when the file names of ``data_dir`` hold more classes than ``--num_classes`` (or ``--flag``)."""
    found = max(class_labels(paths), default=-1) + 1
    if found > num_classes:
        raise UserError(
            f"--data_dir {data_dir} has {found} classes (file-name prefixes), more than --{flag} "
            f"{num_classes}: pass --{flag} {found}"
        )


def check_same_classes(data_dir: str, paths: Sequence[str], other_dir: str, other_paths: Sequence[str]) -> None:
    """
    A UserError when the folder ``other_dir`` (validation images) has other class names than
    ``data_dir``: labels number the sorted names of each folder, so they would not match.
    """
    names, others = sorted(set(class_names(paths))), sorted(set(class_names(other_paths)))
    if names != others:
        missing, extra = sorted(set(names) - set(others)), sorted(set(others) - set(names))
        raise UserError(
            f"--val_data_dir {other_dir}: its classes differ from --data_dir {data_dir}'s "
            f"(missing {missing[:5]}, extra {extra[:5]}), so its labels would number other classes"
        )


def image_mode(image_channels: int, flag: str = "image_channels") -> str:
    """The PIL mode of ``--image_channels`` (or ``--flag``): 1 "L", 2 "LA", 3 "RGB", 4 "RGBA"."""
    if image_channels not in IMAGE_MODES:
        raise UserError(f"--{flag} {image_channels}: expected 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)")
    return IMAGE_MODES[image_channels]


def read_image(path: str, mode: str = "RGB") -> Image.Image:
    """
    Decode an image file fully into a PIL image of ``mode`` (default RGB, as the original).

    Grayscale, palette, alpha (dropped for RGB, as the original does) and 16-bit images are
    converted properly (16-bit values are scaled to 8 bits, not clipped); colour becomes grey
    by PIL's ITU-R 601 luma for mode "L". Images larger than
    ``PIL.Image.MAX_IMAGE_PIXELS`` are refused rather than only warned about.

    :raises UserError: naming ``path`` for an unreadable, truncated, empty or too large file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with bf.BlobFile(path, "rb") as f:
                image = Image.open(f)
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(
            f"refusing image {path}: more pixels than PIL.Image.MAX_IMAGE_PIXELS "
            f"({Image.MAX_IMAGE_PIXELS}); resize it first"
        ) from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if os.path.exists(path) and os.path.getsize(path) == 0:
            reason = "the file is empty (0 bytes)"
        raise UserError(f"could not read image {path}: {reason}") from exc
    return _to_mode(image, mode)


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale (PNG): Pillow's convert("RGB") would clip at 255, so scale instead.
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert(mode)


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """
    Resize and centre-crop an image as the original does.

    Halve with a box filter while the shorter side is at least ``2 * image_size``, then scale
    with bicubic resampling so the shorter side is ``image_size`` (this also enlarges small
    images), then crop the centre square.

    :return: (image_size, image_size, C) uint8 array, C the image's channels.
    """
    arr = _resize_shorter_side(image, image_size)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def random_crop_arr(
    image: Image.Image,
    image_size: int,
    rng: np.random.Generator,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
) -> np.ndarray:
    """
    guided-diffusion's random crop [ADM]: resize so the shorter side is a length drawn uniformly
    from [ceil(S / max_crop_frac), ceil(S / min_crop_frac)] (box halving, then bicubic, as
    :func:`center_crop_arr`), then cut an S x S square at a uniformly random place.

    :param rng: draws the side and the place (so a seed fixes the crop).
    :return: (image_size, image_size, C) uint8 array, C the image's channels.
    """
    low, high = math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac)
    arr = _resize_shorter_side(image, int(rng.integers(low, high + 1)))
    crop_y = int(rng.integers(0, arr.shape[0] - image_size + 1))
    crop_x = int(rng.integers(0, arr.shape[1] - image_size + 1))
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _resize_shorter_side(image: Image.Image, side: int) -> np.ndarray:
    """
    Halve with a box filter while the shorter side is >= 2 * side, then bicubic to a shorter side
    of ``side``; returns (H, W, C) uint8.
    """
    while min(*image.size) >= 2 * side:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = side / min(*image.size)
    image = image.resize(tuple(max(side, round(x * scale)) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    return arr[:, :, None] if arr.ndim == 2 else arr  # one-band modes: (H, W) -> (H, W, 1)


def _ignore_stop_signals(worker_id: int) -> None:
    """
    Decoding workers leave SIGINT / SIGTERM to the training process, which saves a checkpoint
    at the next step and then shuts them down (a job scheduler signals every process).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _LoadError:
    """A picklable stand-in for a batch that failed to load in a worker process."""

    def __init__(self, message: str):
        self.message = message


class ImageDataset(torch.utils.data.Dataset):
    """
    Images of one shard; item ``(i, flip)`` or ``(i, flip, crop_seed)`` is a (C, H, W) float32
    array in ``[-1, 1]`` and its class (or -1), or a :class:`_LoadError` for an unreadable file.
    ``mode`` is the PIL mode every file is converted to (C = its number of bands); with
    ``random_crop``, ``crop_seed`` seeds the item's :func:`random_crop_arr`.
    """

    def __init__(
        self,
        resolution: int,
        image_paths: Sequence[str],
        classes: Optional[Sequence[int]] = None,
        random_crop: bool = False,
        mode: str = "RGB",
    ):
        super().__init__()
        self.resolution = resolution
        self.mode = mode
        self.local_images = list(image_paths)
        self.local_classes = None if classes is None else list(classes)
        self.random_crop = random_crop

    def __len__(self) -> int:
        return len(self.local_images)

    def __getitem__(self, item: Tuple[int, ...]) -> Any:
        idx, flip, crop_seed = (*item, 0)[:3]
        try:
            image = read_image(self.local_images[idx], self.mode)
            if self.random_crop:
                arr = random_crop_arr(image, self.resolution, np.random.default_rng(crop_seed))
            else:
                arr = center_crop_arr(image, self.resolution)
        except UserError as exc:
            return _LoadError(str(exc))
        if flip:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1
        label = -1 if self.local_classes is None else self.local_classes[idx]
        return np.ascontiguousarray(np.transpose(arr, [2, 0, 1])), label


def _collate(items: List[Any]) -> Any:
    for item in items:
        if isinstance(item, _LoadError):
            return item
    images = torch.from_numpy(np.stack([arr for arr, _ in items]))
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return images, labels


class _IndexStream(torch.utils.data.Sampler):
    """
    Batches of ``(index, flip, crop_seed)`` triples read from the endless concatenation of
    per-epoch permutations, starting at absolute position ``self.start`` (epoch = position // n).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, random_flip: bool, seed: int):
        self.n, self.batch_size = n, batch_size
        self.shuffle, self.random_flip, self.seed = shuffle, random_flip, seed
        self.start = 0

    def epoch_order(self, epoch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """File indices, flip decisions and crop seeds of one epoch (a pure function of seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        flips = rng.random(self.n) < 0.5 if self.random_flip else np.zeros(self.n, dtype=bool)
        crop_seeds = rng.integers(0, 2**63 - 1, size=self.n)  # used only by a random-crop data set
        return order, flips, crop_seeds

    def __iter__(self) -> Iterator[List[Tuple[int, bool, int]]]:
        position = self.start
        epoch, (order, flips, crop_seeds) = -1, (None, None, None)
        while True:
            batch = []
            while len(batch) < self.batch_size:
                if position // self.n != epoch:
                    epoch = position // self.n
                    order, flips, crop_seeds = self.epoch_order(epoch)
                i = position % self.n
                batch.append((int(order[i]), bool(flips[i]), int(crop_seeds[i])))
                position += 1
            yield batch


class SuperResLoader:
    """
    Batches of large images whose ``model_kwargs`` also hold ``"low_res"``: the batch shrunk to
    ``small_size`` by area averaging, as the original's super-resolution training does.
    """

    def __init__(self, data: "ImageLoader", small_size: int):
        self.data, self.small_size = data, small_size

    def __iter__(self) -> "SuperResLoader":
        return self

    def __next__(self) -> Batch:
        large, model_kwargs = next(self.data)
        model_kwargs = dict(model_kwargs, low_res=F.interpolate(large, self.small_size, mode="area"))
        return large, model_kwargs

    def state_dict(self) -> Dict[str, int]:
        """The position of the underlying loader."""
        return self.data.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue from a saved position."""
        self.data.load_state_dict(state)


def load_superres_data(*, large_size: int, small_size: int, **kwargs: Any) -> SuperResLoader:
    """
    :func:`load_data` at ``large_size`` plus ``model_kwargs["low_res"]``: (N, C, small_size,
    small_size) area-downsampled copies of the batch. Other arguments as :func:`load_data`.
    """
    return SuperResLoader(load_data(image_size=large_size, **kwargs), small_size)


class ImageLoader:
    """
    Endless iterator of training batches with a resumable position.

    ``state_dict()`` records how many images this iterator has handed out (not how many the
    workers have decoded ahead), so restoring it continues with the next unseen batch.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        shuffle: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ):
        self.dataset = dataset
        self.class_cond = dataset.local_classes is not None
        self.stream = _IndexStream(len(dataset), batch_size, shuffle, random_flip, seed)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.stream,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if num_workers > 0 else None,
            # Its own generator: starting an iterator (as a resume does) must not draw from
            # the global torch RNG, or the training noise after a resume would differ.
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
        )
        self.position = 0
        self._iter: Optional[Iterator[Any]] = None

    def __iter__(self) -> "ImageLoader":
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            self.stream.start = self.position
            self._iter = iter(self.loader)
            if self.loader.num_workers > 0:
                _LIVE_ITERATORS.add(self._iter)
        batch = next(self._iter)
        if isinstance(batch, _LoadError):
            raise UserError(batch.message)
        images, labels = batch
        self.position += images.shape[0]
        return images, ({"y": labels} if self.class_cond else {})

    def state_dict(self) -> Dict[str, int]:
        """The loader's position: images handed out so far (epoch = position // shard size)."""
        return {"position": self.position, "shard_size": len(self.dataset), "seed": self.stream.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue from a saved position (the next batch is the one after the saved ones)."""
        self.position = int(state["position"])
        self.close()

    def close(self) -> None:
        """Stop the decoding workers, if any (the next batch starts them again)."""
        iterator, self._iter = self._iter, None
        if iterator in _LIVE_ITERATORS:
            _LIVE_ITERATORS.discard(iterator)
            _shutdown_iterator(iterator)

    def __del__(self) -> None:
        self.close()


# Iterators with worker processes, held strongly until closed: a loader dropped inside a
# reference cycle (say, a traceback) would otherwise be collected with the iterator's queues
# already finalised, so its workers never hear "stop" and, since they ignore SIGTERM, never end.
_LIVE_ITERATORS: set = set()


def _shutdown_iterator(iterator: Any) -> None:
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


@atexit.register  # registered after torch's and multiprocessing's exit hooks, so it runs before them
def _shutdown_live_iterators() -> None:
    while _LIVE_ITERATORS:
        _shutdown_iterator(_LIVE_ITERATORS.pop())
