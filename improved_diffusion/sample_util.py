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

Samples are numbered globally: rank ``r`` of ``n`` takes samples ``r, r + n, ...``; after each
batch rank 0 alone receives every rank's batch (as uint8 on the host) and finally puts them in
index order, so the archive's order does not depend on ``n`` either, and no rank but rank 0 ever
holds more than one batch.
"""

import argparse
import contextlib
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
from .fileio import atomic_save_json, atomic_save_npz
from .flags import sampling_defaults  # noqa: F401  (importable from here, as before)
from .image_utils import save_sample_grid, to_uint8_nhwc
from .precision import AUTO, MixedPrecision, ModelCall, native_bf16, set_cuda_math
from .samplers import ANCESTRAL, classifier_free_guidance, network_evaluations, resolve_sampler, sample_loop
from .script_util import ARGS_JSON, NUM_CLASSES, args_to_dict, save_args_json, speed_from_args

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
    if args.eta != 0 and resolve_sampler(args.sampler, args.use_ddim) != "ddim":
        raise UserError(f"--eta {args.eta} only applies to DDIM sampling: add --sampler ddim (or --use_ddim True)")
    if not args.guidance_scale >= 0 or args.guidance_scale == float("inf"):
        raise UserError(f"--guidance_scale {args.guidance_scale}: must be a finite number >= 0 (1: no guidance)")


def check_sampler_flags(args: argparse.Namespace, diffusion: Any, model: torch.nn.Module) -> int:
    """
    Resolve ``--sampler`` (``--use_ddim True`` means ``ddim``) into ``args.sampler`` and check
    it against the diffusion's (respaced) steps, and ``--guidance_scale`` against the model.

    :return: the number of network evaluations (NFE) per sample.
    """
    args.sampler = resolve_sampler(args.sampler, args.use_ddim)
    check_guidance(args.guidance_scale, model)
    return network_evaluations(args.sampler, diffusion.num_timesteps)


def check_guidance(guidance_scale: float, model: torch.nn.Module) -> None:
    """
    Classifier-free guidance (any ``--guidance_scale`` but 1) needs a null label: a label table
    of ``num_classes + 1`` rows, i.e. a model trained with ``--class_dropout_prob > 0``. The
    model is built from the flags and loads its checkpoint strictly, so its table is the
    checkpoint's.
    """
    if guidance_scale == 1.0:
        return
    label_emb = getattr(model, "label_emb", None)
    if label_emb is None:
        raise UserError(
            f"--guidance_scale {guidance_scale}: classifier-free guidance needs a class-conditional model trained "
            "with --class_dropout_prob > 0; this one is unconditional (--class_cond False)"
        )
    rows = label_emb.weight.shape[0]
    if rows != model.num_classes + 1:
        raise UserError(
            f"--guidance_scale {guidance_scale}: classifier-free guidance needs a model trained with "
            f"--class_dropout_prob > 0, whose label table has a null row; this one has {rows} rows = --num_classes "
            f"{model.num_classes} (--class_dropout_prob 0; pass the training value if args.json is missing)"
        )


def guided(model_fn: Callable[..., torch.Tensor], model: torch.nn.Module, guidance_scale: float) -> Callable:
    """
    ``model_fn`` (the model, maybe under autocast) with classifier-free guidance at ``guidance_scale``
    [CFG Eq. 6] (:func:`.samplers.classifier_free_guidance`); unchanged at 1. Checked by :func:`check_guidance`.
    """
    check_guidance(guidance_scale, model)
    if guidance_scale == 1.0:
        return model_fn
    logger.log(
        f"--guidance_scale {guidance_scale}: classifier-free guidance, each network evaluation one pass of "
        "the conditional and unconditional halves (twice the batch)"
    )
    return classifier_free_guidance(model_fn, guidance_scale, null_label=model.null_label)


def save_sampling_args(args: argparse.Namespace, nfe: int) -> str:
    """
    Write every flag plus ``nfe`` (network evaluations per sample) as ``args.json`` beside the
    ``.npz`` in the log folder; ``sample_args.json`` if that folder holds the checkpoint, whose
    training ``args.json`` it must not replace. Call on rank 0 only.

    :return: the path written.
    """
    folder = logger.get_dir()
    record = argparse.Namespace(**vars(args), nfe=nfe)
    checkpoint_folder = os.path.dirname(os.path.abspath(args.model_path))
    if os.path.abspath(folder) != checkpoint_folder:
        return save_args_json(record, folder)
    path = os.path.join(folder, "sample_" + ARGS_JSON)
    atomic_save_json(vars(record), path)
    logger.log(f"the log folder holds the checkpoint and its {ARGS_JSON}: sampling flags saved as {path}")
    return path


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
        logger.log(set_cuda_math())  # float32 sampling is float32 (no TF32)
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
    sampler: str = ANCESTRAL,
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
    :param sampler: one of :data:`.samplers.SAMPLERS` (``use_ddim=True`` means ``"ddim"``);
        the diffusion's (respaced) steps decide where the model is evaluated.
    :param kwargs_fn: called per batch with the batch's global indices and their generators
        (already used for x_T) and returns the model kwargs, e.g. ``{"y": (B,) int64}``.
    :param gather_keys: the model kwargs to return with the images (labels; not ``low_res``).
    :param script: ``IMAGE_SAMPLE_SCRIPT`` or ``SUPER_RES_SCRIPT``, mixed into every seed.
    :param cond_fn: classifier guidance (e.g. :func:`classifier_cond_fn`), given the model kwargs.
    :return: on rank 0 the (num_samples, H, W, C) uint8 images in index order and the model
        kwargs in ``gather_keys``, gathered the same way, as NumPy arrays; on other ranks
        ``(None, {})``.
    """
    sampler = resolve_sampler(sampler, use_ddim)
    nfe = network_evaluations(sampler, diffusion.num_timesteps)
    logger.log(f"sampler {sampler}: {diffusion.num_timesteps} steps, {nfe} network evaluations per sample (NFE)")
    rank = dist_util.get_rank()
    show = progress and rank == 0
    indices = rank_indices(num_samples)
    # Every rank takes part in as many gathers as rank 0 (which has the most samples) has batches.
    num_batches = -(-len(range(0, num_samples, dist_util.get_world_size())) // batch_size)
    parts: List[Dict[str, np.ndarray]] = []
    for batch_index in _progress(range(num_batches), show, "batches"):
        batch = indices[batch_index * batch_size : (batch_index + 1) * batch_size]
        generators = sample_generators(seed, batch, script)
        model_kwargs = kwargs_fn(batch, generators) if kwargs_fn is not None else {}
        local = {"index": batch, **{k: v.cpu().numpy() for k, v in model_kwargs.items() if k in gather_keys}}
        if len(batch):
            noise = torch.stack([torch.randn(image_shape, generator=g) for g in generators])
            # Step noise: the diffusion draws it from the global RNG (see the module docstring).
            torch.manual_seed(derive_seed(seed, script, _STEP_STREAM, rank, batch_index))
            sample = _run_loop(model, diffusion, noise, model_kwargs, sampler, eta, clip_denoised, show, cond_fn)
            local["images"] = to_uint8_nhwc(sample)
        else:  # a rank with fewer samples still takes part in every gather
            c, h, w = image_shape
            local["images"] = np.zeros((0, h, w, c), dtype=np.uint8)
        parts += dist_util.gather_to_rank0(local) or []
    if rank != 0:
        return None, {}
    gathered = _in_index_order(parts, num_samples)
    return gathered.pop("images"), gathered


def _run_loop(
    model: Callable[..., torch.Tensor],
    diffusion: Any,
    noise: torch.Tensor,
    model_kwargs: Dict[str, torch.Tensor],
    sampler: str,
    eta: float,
    clip_denoised: bool,
    progress: bool,
    cond_fn: Optional[Callable[..., torch.Tensor]] = None,
) -> torch.Tensor:
    """One batch through the ``sampler``'s loop (:func:`.samplers.sample_loop`), from x_T = ``noise`` (B, C, H, W)."""
    device = dist_util.dev()
    with torch.no_grad():
        return sample_loop(
            diffusion,
            model,
            tuple(noise.shape),
            sampler=sampler,
            eta=eta,
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


def _in_index_order(parts: Sequence[Dict[str, np.ndarray]], num_samples: int) -> Dict[str, np.ndarray]:
    """
    Put the rows of gathered batches at their global sample index.

    :param parts: per batch and rank, ``"index"`` (n,) int64 global indices and (n, ...) arrays.
    :return: the (num_samples, ...) arrays under the same keys, ``"index"`` left out.
    """
    order = np.concatenate([part["index"] for part in parts])
    assert sorted(order.tolist()) == list(range(num_samples))
    out = {}
    for key in parts[0] if parts else ():
        if key != "index":
            values = np.concatenate([part[key] for part in parts])
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


def parse_class_labels(text: str, class_cond: bool, num_classes: int = NUM_CLASSES) -> Optional[List[int]]:
    """
    Parse ``--class_labels "0,1,2"`` (cycled over the samples); each in ``[0, num_classes)``.

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
        if not 0 <= label < num_classes:
            raise UserError(f"--class_labels {text!r}: label {label} is outside [0, {num_classes}) (--num_classes)")
        labels.append(label)
    return labels


def labels_for(
    indices: np.ndarray,
    generators: List[torch.Generator],
    class_labels: Optional[List[int]],
    num_classes: int = NUM_CLASSES,
) -> torch.Tensor:
    """
    Class labels of the samples ``indices``: ``class_labels`` cycled by global index, else a
    uniform random label in ``[0, num_classes)`` drawn from each sample's own generator (after
    its start noise).

    :return: (B,) int64.
    """
    if class_labels is not None:
        return torch.tensor([class_labels[int(i) % len(class_labels)] for i in indices], dtype=torch.int64)
    return torch.cat(
        [torch.randint(0, num_classes, (1,), generator=g) for g in generators] + [torch.zeros(0, dtype=torch.int64)]
    )


def class_label_kwargs(class_labels: Optional[List[int]], num_classes: int = NUM_CLASSES) -> KwargsFn:
    """The ``kwargs_fn`` of a class-conditional model: ``{"y": labels_for(...)}``."""

    def kwargs_fn(indices: np.ndarray, generators: List[torch.Generator]) -> Dict[str, torch.Tensor]:
        return {"y": labels_for(indices, generators, class_labels, num_classes)}

    return kwargs_fn
