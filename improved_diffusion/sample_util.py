"""
What the sampling scripts (``image_sample.py``, ``super_res_sample.py``) share: their flags,
loading a checkpoint with the flags of its ``args.json``, per-sample seeded noise, the
sampling loop over ranks and batches, and writing ``samples_{N}x{H}x{W}x3.npz`` plus a PNG
grid.

Reproducibility (per-sample seeds, as in EDM's ``generate.py``): sample ``i`` gets its own
``torch.Generator`` seeded from ``(seed, i)`` (and the script, so that super-resolution
noise is not the base samples' noise again). It draws that sample's start noise x_T and
then, where the script needs one, its random class label. The noise added at each ancestral
step (and by DDIM with ``eta > 0``) comes from the global RNG inside the diffusion, which is
reseeded from ``(seed, rank, batch index)`` before every batch. Hence:

- DDIM with ``eta = 0`` depends only on x_T: sample ``i`` is the same whatever the batch size
  and the number of processes (up to float rounding of batched convolutions);
- ancestral sampling and DDIM with ``eta > 0`` repeat exactly for the same seed, batch size and
  number of processes.

Samples are numbered globally: rank ``r`` of ``n`` takes samples ``r, r + n, ...`` and rank 0
gathers them back into index order, so the archive's order does not depend on ``n`` either.
"""

import argparse
import contextlib
import functools
import os
import shlex
import sys
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import dist_util, logger
from .checkpoints import load_model_state
from .errors import UserError
from .fileio import atomic_save_npz
from .flags import sampling_defaults  # noqa: F401  (importable from here, as before)
from .image_utils import save_sample_grid, to_uint8_nhwc
from .precision import AUTO, MixedPrecision, ModelCall, native_bf16
from .script_util import NUM_CLASSES, args_to_dict, speed_from_args

# Tags keep the seed streams of start noise and step noise apart.
_SAMPLE_STREAM = 0
_STEP_STREAM = 1
# Tags of the scripts, so that super-resolution noise is not a copy of the base samples' noise.
IMAGE_SAMPLE_SCRIPT = 0
SUPER_RES_SCRIPT = 1

KwargsFn = Callable[[np.ndarray, List[torch.Generator]], Dict[str, torch.Tensor]]


def add_grid_alias(parser: argparse.ArgumentParser) -> None:
    """Accept ``--grid_size`` as another name of ``--num_grid``."""
    parser.add_argument("--grid_size", dest="num_grid", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def validate_sampling_args(args: argparse.Namespace) -> None:
    """Check the shared sampling flags; a bad value raises a UserError naming the flag."""
    require_model_path(args)
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} {getattr(args, name)}: must be a positive integer")
    if args.num_grid < 0:
        raise UserError(f"--num_grid {args.num_grid}: must be 0 (no grid) or a positive integer")
    if args.eta < 0:
        raise UserError(f"--eta {args.eta}: DDIM eta must be >= 0 (0 = deterministic)")
    if args.eta != 0 and not args.use_ddim:
        raise UserError(f"--eta {args.eta} only applies to DDIM sampling: add --use_ddim True")


def require_model_path(args: argparse.Namespace) -> None:
    """A missing ``--model_path`` is a one-line error."""
    if not args.model_path:
        raise UserError(
            "--model_path is required: the checkpoint (.pt) to load, e.g. --model_path logs/ema_0.9999_010000.pt"
        )


def log_saved_flags(taken: Dict[str, Any], model_path: str, argv: Optional[Sequence[str]]) -> None:
    """Log which model/diffusion flags came from the ``args.json`` beside the checkpoint."""
    if not taken:
        if model_path:
            logger.log(f"no args.json beside {model_path}: model/diffusion flags from the command line and defaults")
        return
    given = _flags_on_command_line(argv)
    from_json = {k: v for k, v in sorted(taken.items()) if k not in given}
    folder = os.path.dirname(os.path.abspath(model_path))
    logger.log(
        f"flags from {os.path.join(folder, 'args.json')}: "
        + " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in from_json.items())
    )
    overridden = sorted(k for k in taken if k in given)
    if overridden:
        logger.log("given on the command line instead: " + " ".join(f"--{k}" for k in overridden))


def _flags_on_command_line(argv: Optional[Sequence[str]]) -> set:
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}


def build_model_and_diffusion(
    args: argparse.Namespace,
    keys: Iterable[str],
    create_fn: Callable[..., Tuple[torch.nn.Module, Any]],
) -> Tuple[torch.nn.Module, Any]:
    """
    Build the model and diffusion from the MODEL/DIFFUSION flags ``keys`` (on the CPU, before
    any log folder or process group exists, so bad flag values fail first).

    :return: ``(model, diffusion)``, the model with the speed settings of the SPEED flags.
    """
    return create_fn(**args_to_dict(args, keys), speed=speed_from_args(args))


@contextlib.contextmanager
def model_session(
    args: argparse.Namespace,
    taken: Dict[str, Any],
    argv: Optional[Sequence[str]],
    model: torch.nn.Module,
    keys: Iterable[str],
) -> Iterator[None]:
    """
    What every script that loads a trained model does before its work, as a context: join the
    process group, abort every rank on an error inside, open the log folder, log the model's
    speed settings and the flags taken from ``args.json``, and load ``--model_path``.
    """
    dist_util.setup_dist()
    with dist_util.abort_on_error():
        logger.configure(dir=args.log_dir or None)
        logger.log(model.speed.summary())
        log_saved_flags(taken, args.model_path, argv)
        logger.log(f"loading {args.model_path}...")
        load_checkpoint(model, args, keys)
        yield
        for line in model.speed_report():  # the convolution paths chosen by timing (--winograd auto)
            logger.log(line)


def load_checkpoint(
    model: torch.nn.Module, args: argparse.Namespace, keys: Iterable[str], path_flag: str = "model_path"
) -> None:
    """
    Load ``--model_path`` (or the flag ``path_flag``, e.g. ``classifier_path``) into ``model``,
    move it to ``dist_util.dev()`` and put it in eval mode.

    The state dict is read on rank 0 and broadcast (``dist_util.load_state_dict``, weights
    only); a mismatch with the flags raises a UserError naming the checkpoint, the keys and
    shapes, and the flags that probably differ.
    """
    path = getattr(args, path_flag)
    state_dict = dist_util.load_state_dict(path, map_location="cpu")
    load_model_state(model, state_dict, path, flags=args_to_dict(args, keys))
    model.to(dist_util.dev())
    # Sampling and evaluation: eval() turns dropout off; forgetting it changes every sample.
    model.eval()


def bf16_autocast(model: Callable[..., torch.Tensor], enabled: Union[bool, str]) -> Callable[..., torch.Tensor]:
    """
    The model call under bfloat16 autocast when ``enabled`` (``"auto"``: where the device runs
    bfloat16 natively) through :class:`.precision.ModelCall`, its output cast back to float32,
    so the diffusion's own arithmetic (posterior, KL, bits/dim) stays in float32.
    """
    if enabled == AUTO:
        enabled = native_bf16(dist_util.dev())
        logger.log(f"--use_bf16 auto: {'bfloat16 autocast' if enabled else 'float32'} on {dist_util.dev().type}")
    if not enabled:
        return model
    logger.log(f"--use_bf16: the model runs under bfloat16 autocast on {dist_util.dev().type}")
    return ModelCall(model, MixedPrecision(dist_util.dev(), use_bf16=True, log=logger.log))


def derive_seed(*entropy: int) -> int:
    """A 63-bit seed mixed from non-negative integers (NumPy's SeedSequence)."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_generators(seed: int, indices: Sequence[int], script: int = IMAGE_SAMPLE_SCRIPT) -> List[torch.Generator]:
    """One CPU generator per global sample index, seeded from ``(seed, script, index)``."""
    return [torch.Generator().manual_seed(derive_seed(seed, script, _SAMPLE_STREAM, int(i))) for i in indices]


def rank_indices(num_samples: int) -> np.ndarray:
    """The global sample indices this rank draws: ``rank, rank + world, ...``."""
    return np.arange(dist_util.get_rank(), num_samples, dist_util.get_world_size())


def sample_images(
    model: Callable[..., torch.Tensor],
    diffusion: Any,
    *,
    num_samples: int,
    batch_size: int,
    image_shape: Tuple[int, int, int],
    seed: int,
    use_ddim: bool = False,
    eta: float = 0.0,
    clip_denoised: bool = True,
    kwargs_fn: Optional[KwargsFn] = None,
    gather_keys: Sequence[str] = ("y",),
    script: int = IMAGE_SAMPLE_SCRIPT,
    progress: bool = True,
    cond_fn: Optional[Callable[..., torch.Tensor]] = None,
) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """
    Draw ``num_samples`` images, split over the ranks, with per-sample seeded start noise.

    :param image_shape: ``(C, H, W)`` of one sample.
    :param kwargs_fn: called per batch with the batch's global indices and their generators
        (already used for x_T) and returns the model kwargs, e.g. ``{"y": (B,) int64}``.
    :param gather_keys: the model kwargs to return with the images (labels; not ``low_res``).
    :param script: ``IMAGE_SAMPLE_SCRIPT`` or ``SUPER_RES_SCRIPT``, mixed into every seed.
    :param cond_fn: classifier guidance (e.g. :func:`classifier_cond_fn`), given the model kwargs.
    :return: on rank 0 the (num_samples, H, W, C) uint8 images in index order and the model
        kwargs in ``gather_keys``, gathered the same way, as NumPy arrays; on other ranks
        ``(None, {})``.
    """
    rank = dist_util.get_rank()
    show = progress and rank == 0
    indices = rank_indices(num_samples)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    images, kwargs_parts = [], []
    for batch_index, batch in enumerate(_progress(batches, show, "batches")):
        generators = sample_generators(seed, batch, script)
        noise = torch.stack([torch.randn(image_shape, generator=g) for g in generators])  # (B, C, H, W)
        model_kwargs = kwargs_fn(batch, generators) if kwargs_fn is not None else {}
        # Step noise: the diffusion draws it from the global RNG (see the module docstring).
        torch.manual_seed(derive_seed(seed, script, _STEP_STREAM, rank, batch_index))
        sample = _run_loop(model, diffusion, noise, model_kwargs, use_ddim, eta, clip_denoised, show, cond_fn)
        images.append(torch.from_numpy(to_uint8_nhwc(sample)))
        kwargs_parts.append({k: v.cpu() for k, v in model_kwargs.items() if k in gather_keys})
    if not batches and kwargs_fn is not None:
        # A rank with no samples still takes part in every gather, with empty tensors.
        kwargs_parts.append({k: v for k, v in kwargs_fn(indices, []).items() if k in gather_keys})
    c, h, w = image_shape
    local = {"images": torch.cat(images) if images else torch.zeros((0, h, w, c), dtype=torch.uint8)}
    for key in kwargs_parts[0] if kwargs_parts else ():
        local[key] = torch.cat([part[key] for part in kwargs_parts])
    gathered = _gather_in_order(local, torch.from_numpy(indices), num_samples)
    if gathered is None:
        return None, {}
    return gathered.pop("images"), gathered


def _run_loop(
    model: Callable[..., torch.Tensor],
    diffusion: Any,
    noise: torch.Tensor,
    model_kwargs: Dict[str, torch.Tensor],
    use_ddim: bool,
    eta: float,
    clip_denoised: bool,
    progress: bool,
    cond_fn: Optional[Callable[..., torch.Tensor]] = None,
) -> torch.Tensor:
    """One batch through the ancestral or DDIM loop, from x_T = ``noise`` (B, C, H, W)."""
    device = dist_util.dev()
    loop = functools.partial(diffusion.ddim_sample_loop, eta=eta) if use_ddim else diffusion.p_sample_loop
    with torch.no_grad():
        return loop(
            model,
            tuple(noise.shape),
            noise=noise.to(device),
            clip_denoised=clip_denoised,
            model_kwargs={k: v.to(device) for k, v in model_kwargs.items()},
            device=device,
            progress=progress,
            cond_fn=cond_fn,
        )


def classifier_cond_fn(classifier: Callable[..., torch.Tensor], classifier_scale: float) -> Callable[..., torch.Tensor]:
    """
    The guidance gradient of a noised classifier [ADM §4, Alg. 1 and 2]:
    ``cond_fn(x, t, y) = classifier_scale * d/dx sum_i log_softmax(classifier(x, t))[i, y_i]``,
    for the sampling methods' ``cond_fn`` (which pass the model's timesteps and kwargs).

    :param classifier: maps ``(x (N, C, H, W), t (N,))`` to logits ``(N, classes)``; kept in eval mode.
    :param classifier_scale: the guidance scale s (0 = unguided).
    :return: ``cond_fn(x, t, y=None, **other_model_kwargs)`` -> (N, C, H, W) float32 gradient.
    """

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, **_: Any) -> torch.Tensor:
        if y is None:
            raise UserError("classifier guidance needs the labels y to guide towards (model_kwargs['y'])")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t).float(), dim=-1)  # (N, classes)
            selected = log_probs[torch.arange(len(y), device=y.device), y]  # (N,)
            return torch.autograd.grad(selected.sum(), x_in)[0] * classifier_scale

    return cond_fn


def labels_for_classifier_only(model: Callable[..., torch.Tensor], class_cond: bool) -> Callable[..., torch.Tensor]:
    """
    The model as guided sampling calls it: the labels ``y`` of the model kwargs always reach the
    classifier (``cond_fn``), but the model only when it is class-conditional (guided-diffusion's
    ``model_fn``), so an unconditional model can be guided too.
    """
    if class_cond:
        return model

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        return model(x, t, **kwargs)

    return model_fn


def _gather_in_order(
    local: Dict[str, torch.Tensor], index: torch.Tensor, num_samples: int
) -> Optional[Dict[str, np.ndarray]]:
    """
    Gather per-sample tensors from every rank and put each row at its global sample index.

    :param local: this rank's (n_r, ...) tensors.
    :param index: (n_r,) int64 global indices of those rows.
    :return: on rank 0 the (num_samples, ...) arrays under the same keys; None elsewhere.
    """
    order = torch.cat(dist_util.all_gather_tensors(index)).numpy()
    parts = {key: dist_util.all_gather_tensors(value) for key, value in local.items()}
    if dist_util.get_rank() != 0:
        return None
    assert sorted(order.tolist()) == list(range(num_samples))
    out = {}
    for key, tensors in parts.items():
        values = torch.cat(tensors).numpy()
        out[key] = np.empty_like(values)
        out[key][order] = values
    return out


def _progress(items: Sequence[Any], show: bool, desc: str) -> Iterable[Any]:
    if not show:
        return items

    return tqdm(items, desc=desc, leave=False)


def save_samples(
    images: np.ndarray,
    labels: Optional[np.ndarray] = None,
    num_grid: int = 64,
    rows_by_label: bool = False,
) -> str:
    """
    Write ``samples_{N}x{H}x{W}x{C}.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` int64 labels when
    given) in the log folder, and a PNG grid of the first ``num_grid`` samples beside it.
    Call on rank 0 only.

    :return: the ``.npz`` path.
    """
    shape_str = "x".join(str(s) for s in images.shape)
    path = os.path.join(logger.get_dir(), f"samples_{shape_str}.npz")
    logger.log(f"saving to {path}")
    if labels is None:
        atomic_save_npz(path, images)
    else:
        atomic_save_npz(path, images, np.asarray(labels, dtype=np.int64))
    if num_grid > 0:
        shown = labels[:num_grid] if labels is not None else None
        grid = save_sample_grid(
            path, images[:num_grid], labels=shown, rows_by_label=rows_by_label and shown is not None
        )
        logger.log(f"grid of the first {min(num_grid, len(images))} samples: {grid}")
    return path


def parse_class_labels(text: str, class_cond: bool) -> Optional[List[int]]:
    """
    Parse ``--class_labels "0,1,2"`` (cycled over the samples); each in ``[0, NUM_CLASSES)``.

    :return: the labels, or None when the flag is empty.
    """
    if not text:
        return None
    if not class_cond:
        raise UserError(f"--class_labels {text!r} needs a class-conditional model (--class_cond True)")
    labels = []
    for part in text.split(","):
        try:
            label = int(part.strip())
        except ValueError:
            raise UserError(f"--class_labels {text!r}: expected a comma list of integers like 0,1,2") from None
        if not 0 <= label < NUM_CLASSES:
            raise UserError(f"--class_labels {text!r}: label {label} is outside [0, {NUM_CLASSES})")
        labels.append(label)
    return labels


def labels_for(
    indices: np.ndarray, generators: List[torch.Generator], class_labels: Optional[List[int]]
) -> torch.Tensor:
    """
    Class labels of the samples ``indices``: ``class_labels`` cycled by global index, else a
    uniform random label drawn from each sample's own generator (after its start noise).

    :return: (B,) int64.
    """
    if class_labels is not None:
        return torch.tensor([class_labels[int(i) % len(class_labels)] for i in indices], dtype=torch.int64)
    return torch.cat(
        [torch.randint(0, NUM_CLASSES, (1,), generator=g) for g in generators] + [torch.zeros(0, dtype=torch.int64)]
    )


def class_label_kwargs(class_labels: Optional[List[int]]) -> KwargsFn:
    """The ``kwargs_fn`` of a class-conditional model: ``{"y": labels_for(...)}``."""

    def kwargs_fn(indices: np.ndarray, generators: List[torch.Generator]) -> Dict[str, torch.Tensor]:
        return {"y": labels_for(indices, generators, class_labels)}

    return kwargs_fn
