"""
Checkpoint files, whoever writes them (the diffusion trainer, a classifier trainer): their
names, atomic saving, finding the newest complete one, loading weights with a useful error,
the random-generator / sampler / data state an exact resume needs, and the :func:`save` /
:func:`resume` pair trainers call.

Files in a log folder keep the original's names: ``model{step:06d}.pt``,
``ema_{rate}_{step:06d}.pt`` and ``opt{step:06d}.pt``, where ``step`` is the number of steps
done (the original named mid-training saves one lower; old names still parse). A fourth file,
``state{step:06d}.pt``, holds everything else a bit-exact resume needs (random generators of
every rank, data position, loss-aware sampler history, loss scale) as plain tensors and
numbers, so every file loads with ``weights_only=True``. It is written last, so its presence
marks a complete checkpoint; ``resume_checkpoint="auto"`` picks the newest complete one.

Weights are plain ``state_dict``s in the original's layout. A checkpoint that does not fit the
model built from the flags raises a one-line :class:`~improved_diffusion.errors.UserError`
naming the file, the first mismatched / missing / unexpected keys with their shapes, and the
flags the checkpoint was probably trained with, read back from the shapes of its tensors.
"""

import dataclasses
import os
import random
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from . import dist_util, logger
from .errors import UserError
from .fileio import atomic_torch_save, remove_quietly, remove_stale_temporaries, safe_torch_load
from .presets import PRESETS, matching_presets
from .unet import CHANNEL_MULTS, SR_CHANNEL_MULTS

AUTO_RESUME = "auto"
STATE_VERSION = 1
MAX_LISTED = 3  # keys listed per kind of mismatch
# Flags shown in suggestions, in the order of the original's flag list.
_FLAG_ORDER = (
    "image_size",
    "large_size",
    "num_channels",
    "num_res_blocks",
    "learn_sigma",
    "image_channels",
    "class_cond",
    "use_scale_shift_norm",
    "resblock_updown",
    "channel_mult",
)
_BLOCK_KEY = re.compile(r"^input_blocks\.(\d+)\.(\d+)\.")
# An upsampling residual block [ADM]: a residual block after the first child of an output block.
_UP_RESBLOCK_KEY = re.compile(r"^output_blocks\.(\d+)\.[12]\.in_layers\.")
# What the weights cannot show: these change the outputs, not the shapes.
UNSTORED_NOTE = (
    "--num_heads and --num_heads_upsample are not stored in a checkpoint, nor are --num_head_channels, "
    "--use_new_attention_order and --rescale_timesteps (they change the outputs, not the shapes): keep the "
    "training values, or for a released checkpoint use --preset NAME (--preset list)"
)
CLASSIFIER_NOTE = (
    "--classifier_depth and --classifier_attention_resolutions must be the training values; for a released "
    "classifier use --preset adm-classifier64 (128, 256, 512)"
)


def _shape(tensor: torch.Tensor) -> str:
    return str(tuple(tensor.shape))


def _updown_input_blocks(state_dict: Mapping[str, torch.Tensor]) -> Optional[set]:
    """
    With ``resblock_updown`` [ADM] (upsampling residual blocks in the output half), the
    indices of the input blocks that are downsampling residual blocks; else None. Level l of
    n residual blocks ends with output block ``(l + 1) * (n + 1) - 1``, so n = the first one's index.
    """
    ups = sorted({int(m.group(1)) for m in map(_UP_RESBLOCK_KEY.match, state_dict) if m})
    if not ups:
        return None
    per_level = ups[0] + 1  # n residual blocks + the downsampling one
    return {level * per_level + per_level for level in range(len(ups))}


def _input_levels(state_dict: Mapping[str, torch.Tensor]) -> List[List[Tuple[int, set]]]:
    """
    The input blocks after the first conv, grouped by resolution level: for each block its
    index and the set of its children's kinds ("res", "attn", "down"). Downsample blocks
    without weights (no ``conv_resample``) show up as gaps in the numbering; downsampling
    residual blocks (``resblock_updown``) are found from the output half.
    """
    down_blocks = _updown_input_blocks(state_dict) or set()
    kinds: Dict[int, set] = {int(index): {"down"} for index in down_blocks}
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if not match or match.group(1) == "0":
            continue
        if int(match.group(1)) in down_blocks:
            continue
        rest = key[match.end() :]
        kind = "res" if rest.startswith("in_layers") else "attn" if rest.startswith("qkv") else "down"
        kinds.setdefault(int(match.group(1)), set()).add(kind)
    levels: List[List[Tuple[int, set]]] = [[]]
    for index in range(1, max(kinds, default=0) + 1):
        block = kinds.get(index, {"down"})
        if block & {"res", "attn"}:
            levels[-1].append((index, block))
        elif levels[-1]:  # a downsample closes the level
            levels.append([])
    return [level for level in levels if level]


def guess_flags_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """
    Guess the MODEL flags a checkpoint was trained with, from the shapes of its tensors.

    Only what shapes reveal: ``num_channels`` (in-features of ``time_embed.0.weight``, else
    out channels of ``input_blocks.0.0.weight``), ``image_channels`` and ``learn_sigma`` (the
    first conv sees C channels, 2C for super-resolution; ``out.2.weight`` has C rows, or 2C
    with a learned variance), ``class_cond`` (``label_emb.weight`` present), ``use_scale_shift_norm``
    (``emb_layers.1.weight`` rows = 2 x the block's channels), ``resblock_updown`` (residual
    blocks in the upsampling positions [ADM]), ``num_res_blocks``, ``channel_mult`` (e.g.
    ``"1,2,2,2"``, ``"0.5,1,1,2,2,4,4"``) and, where those multipliers belong to exactly one
    known size, ``image_size`` (``large_size`` for a super-resolution model, whose first conv
    sees 6 channels) and ``attention_resolutions`` (e.g. ``"16,8"``).
    ``attention_downsample_factors`` (a tuple) is always given. The heads (``num_heads``,
    ``num_heads_upsample``, ``num_head_channels``), the attention order
    (``use_new_attention_order``), ``rescale_timesteps`` and ``dropout`` leave no trace in the
    weights and cannot be guessed. Keys whose tensors are absent are left out.

    :param state_dict: a model state_dict in the original layout.
    :return: dict of flag name -> guessed value.
    """
    guess: Dict[str, Any] = {}
    first = state_dict.get("input_blocks.0.0.weight")
    if first is None or first.dim() < 2:
        return guess
    channels, in_channels = int(first.shape[0]), int(first.shape[1])
    time_embed = state_dict.get("time_embed.0.weight")
    if time_embed is not None and time_embed.dim() == 2:
        channels = int(time_embed.shape[1])  # the first level may be narrower ([ADM]'s 0.5 at 512)
    guess["num_channels"] = channels
    out = state_dict.get("out.2.weight")
    super_res = in_channels == 6
    if out is not None:
        rows = int(out.shape[0])
        # x has C channels (2C for super-resolution: x and the upsampled low_res); the output C or 2C.
        super_res = in_channels == 2 * rows or (in_channels == rows == 6)
        image_channels = in_channels // 2 if super_res else in_channels
        guess["image_channels"] = image_channels
        guess["learn_sigma"] = rows == 2 * image_channels
    guess["class_cond"] = "label_emb.weight" in state_dict
    scale_shift = _uses_scale_shift_norm(state_dict)
    if scale_shift is not None:
        guess["use_scale_shift_norm"] = scale_shift
    guess["resblock_updown"] = _updown_input_blocks(state_dict) is not None
    levels = _input_levels(state_dict)
    if not levels:
        return guess
    guess["num_res_blocks"] = sum("res" in kinds for _, kinds in levels[0])
    mult = []
    for level in levels:
        res_out = state_dict.get(f"input_blocks.{level[0][0]}.0.out_layers.3.weight")
        if res_out is None:
            return guess
        width = int(res_out.shape[0])
        mult.append(width // channels if width % channels == 0 else width / channels)
    guess["channel_mult"] = ",".join(str(m) for m in mult)
    factors = tuple(2**i for i, level in enumerate(levels) if any("attn" in kinds for _, kinds in level))
    guess["attention_downsample_factors"] = factors
    size = _size_for_channel_mult(tuple(mult), super_res=super_res)
    if size is not None:
        guess["large_size" if super_res else "image_size"] = size
        guess["attention_resolutions"] = ",".join(str(size // f) for f in factors)
    return guess


def _uses_scale_shift_norm(state_dict: Mapping[str, torch.Tensor]) -> Optional[bool]:
    """``emb_layers.1.weight`` rows = 2 x the middle block's channels; None when the keys are absent."""
    emb = state_dict.get("middle_block.0.emb_layers.1.weight")
    mid_out = state_dict.get("middle_block.0.out_layers.3.weight")
    if emb is None or mid_out is None:
        return None
    return int(emb.shape[0]) == 2 * int(mid_out.shape[0])


def guess_classifier_flags(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """
    The noised classifier's flags [ADM §4] that its shapes reveal: ``classifier_width``,
    ``classifier_use_scale_shift_norm`` and ``classifier_pool`` (from the head's keys).
    Depth, attention resolutions and up/down blocks are not read back here.

    :return: dict of flag name -> guessed value; keys whose tensors are absent are left out.
    """
    guess: Dict[str, Any] = {}
    time_embed = state_dict.get("time_embed.0.weight")
    if time_embed is not None and time_embed.dim() == 2:
        guess["classifier_width"] = int(time_embed.shape[1])
    scale_shift = _uses_scale_shift_norm(state_dict)
    if scale_shift is not None:
        guess["classifier_use_scale_shift_norm"] = scale_shift
    head = {key: tensor.dim() for key, tensor in state_dict.items() if key.startswith("out.")}
    if "out.2.positional_embedding" in head:
        guess["classifier_pool"] = "attention"
    elif head.get("out.1.weight") == 1:
        guess["classifier_pool"] = "spatial_v2"
    elif head.get("out.3.weight", 0) >= 3:
        guess["classifier_pool"] = "adaptive"
    elif head.get("out.2.weight") == 2:
        guess["classifier_pool"] = "spatial"
    return guess


def _classifier_hint(
    checkpoint: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], flags: Optional[Mapping[str, Any]]
) -> str:
    """As :func:`_flag_hint`, for the noised classifier's flags."""
    ckpt, built = guess_classifier_flags(checkpoint), guess_classifier_flags(model)
    differ = [name for name in ckpt if name in built and ckpt[name] != built[name]]
    if not differ:
        return ""
    passed = {**built, **(flags or {})}
    label = "you passed" if flags is not None else "the classifier has"
    return f"the checkpoint looks like {_format_flags(ckpt, differ)} ({label} {_format_flags(passed, differ)})"


def _size_for_channel_mult(mult: Tuple[float, ...], super_res: bool = False) -> Optional[int]:
    """The one known image size whose default multipliers are ``mult``, else None."""
    sizes = [size for size, m in (SR_CHANNEL_MULTS if super_res else CHANNEL_MULTS).items() if tuple(m) == mult]
    return sizes[0] if len(sizes) == 1 else None


# Keys that tell most about a flag mismatch are listed first.
_TELLING_KEYS = ("input_blocks.0.0.weight", "out.2.weight", "label_emb.weight", "middle_block.0.emb_layers.1.weight")


def _key_differences(checkpoint: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]) -> List[str]:
    """Phrases for the first mismatched, missing and unexpected keys (with counts of the rest)."""
    mismatched = [k for k in model if k in checkpoint and tuple(checkpoint[k].shape) != tuple(model[k].shape)]
    mismatched.sort(key=lambda k: _TELLING_KEYS.index(k) if k in _TELLING_KEYS else len(_TELLING_KEYS))
    missing = [k for k in model if k not in checkpoint]
    unexpected = [k for k in checkpoint if k not in model]
    phrases = [
        f"{k} is {_shape(checkpoint[k])} in the checkpoint but {_shape(model[k])} in the model"
        for k in mismatched[:MAX_LISTED]
    ]
    phrases += [f"{k} {_shape(model[k])} is missing from the checkpoint" for k in missing[:MAX_LISTED]]
    phrases += [
        f"{k} {_shape(checkpoint[k])} is in the checkpoint but not in the model" for k in unexpected[:MAX_LISTED]
    ]
    for what, keys in (("mismatched", mismatched), ("missing", missing), ("unexpected", unexpected)):
        if len(keys) > MAX_LISTED:
            phrases.append(f"{len(keys) - MAX_LISTED} more {what} keys")
    return phrases


def _format_flags(values: Mapping[str, Any], names: List[str]) -> str:
    return " ".join(f"--{name} {values[name] if values[name] != '' else chr(34) * 2}" for name in names)


def _sides(attention_resolutions: Any) -> set:
    """``"16,8"`` -> {16, 8}; anything unparsable -> an empty set."""
    try:
        return {int(part) for part in str(attention_resolutions).split(",") if part.strip()}
    except ValueError:
        return set()


def _flag_hint(
    checkpoint: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], flags: Optional[Mapping[str, Any]]
) -> str:
    """'the checkpoint looks like --a x (you passed --a y)' for the guessed flags that differ."""
    ckpt = guess_flags_from_state_dict(checkpoint)
    built = guess_flags_from_state_dict(model)
    passed = {**built, **(flags or {})}  # what the user passed, else what the model shows
    differ = [name for name in _FLAG_ORDER if name in ckpt and name in built and ckpt[name] != built[name]]
    if "channel_mult" in differ and {"image_size", "large_size"} & set(differ) and not passed.get("channel_mult"):
        differ.remove("channel_mult")  # the image size implies the multipliers
    extra = ""
    if ckpt.get("attention_downsample_factors") != built.get("attention_downsample_factors"):
        if "attention_resolutions" not in ckpt:
            extra = f"attention at downsample factors {ckpt.get('attention_downsample_factors')}"
        elif _sides(ckpt["attention_resolutions"]) != _sides(passed.get("attention_resolutions")):
            differ.append("attention_resolutions")
    if not differ:
        return extra
    label = "you passed" if flags is not None else "the model has"
    hint = f"the checkpoint looks like {_format_flags(ckpt, differ)}"
    hint += f" ({label} {_format_flags(passed, [name for name in differ if name in passed])})"
    return hint + (f", {extra}" if extra else "")


def _label_table_hint(checkpoint: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]) -> str:
    """What a label table of another size means: ``--num_classes`` and the null row of ``--class_dropout_prob``."""
    ckpt, built = checkpoint.get("label_emb.weight"), model.get("label_emb.weight")
    if ckpt is None or built is None or ckpt.shape[0] == built.shape[0]:
        return ""
    rows = int(ckpt.shape[0])
    return (
        f"; the checkpoint's label table has {rows} rows: --num_classes {rows}, or --num_classes {rows - 1} "
        "with --class_dropout_prob > 0 (its last row the null label of classifier-free guidance)"
    )


def _check_is_state_dict(state_dict: Any, source: str) -> None:
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        keys = ", ".join(map(str, list(state_dict)[:5])) if isinstance(state_dict, Mapping) else ""
        found = f"a dict with keys {keys}" if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise UserError(f"checkpoint {source} is not a model state_dict (found {found}); pass a model or EMA file")


def load_model_state(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, flags: Optional[Mapping[str, Any]] = None
) -> None:
    """
    Load ``state_dict`` into ``model`` strictly (float16 tensors are cast to the model's dtype).

    On any difference in keys or shapes, raise a one-line :class:`UserError` naming ``source``,
    the first mismatched / missing / unexpected keys with their shapes (checkpoint vs model)
    and the flags that probably differ, as guessed by :func:`guess_flags_from_state_dict`
    (:func:`guess_classifier_flags` for the noised classifier, a model without ``output_blocks``).

    :param model: the model built from the flags.
    :param state_dict: the checkpoint's tensors (the original's key layout).
    :param source: where the checkpoint came from (a path), for the message.
    :param flags: the MODEL flags the model was built from (e.g. ``args_to_dict(args, keys)``),
        shown beside the guessed ones; without them the model's own guessed flags are shown.
    """
    _check_is_state_dict(state_dict, source)
    expected = model.state_dict()
    phrases = _key_differences(state_dict, expected)
    if not phrases:
        model.load_state_dict(state_dict, strict=True)
        return
    message = f"checkpoint {source} does not match the model built from the flags: " + ", ".join(phrases)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        message += "; its keys start with 'module.' (saved from a DistributedDataParallel wrapper, not the model)"
    if not any(k.startswith("output_blocks.") for k in expected):  # the noised classifier (no upsampling half)
        hint = _classifier_hint(state_dict, expected, flags)
        raise UserError(message + (f"; {hint}" if hint else "") + f"; {CLASSIFIER_NOTE}")
    hint = _flag_hint(state_dict, expected, flags)
    if hint:
        message += f"; {hint}"
    message += _label_table_hint(state_dict, expected)
    first = state_dict.get("input_blocks.0.0.weight")
    if first is not None and first.dim() >= 2 and int(first.shape[1]) == 6 and "large_size" not in (flags or {}):
        message += "; it is a super-resolution model (6 input channels): use the super_res scripts"
    message += _preset_hint(state_dict)
    message += f"; {UNSTORED_NOTE}"
    raise UserError(message)


def _preset_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'; its shapes are those of --preset NAME (file)' when a released checkpoint's architecture fits."""
    names = matching_presets(guess_flags_from_state_dict(state_dict))
    if not names:
        return ""
    return "; its shapes are those of " + " or ".join(f"--preset {n} ({PRESETS[n].checkpoint})" for n in names)


# ---------------------------------------------------------------------------------------------
# file names


def checkpoint_files(folder: str, step: int, ema_rates: Sequence[float]) -> Dict[str, Any]:
    """Paths of one checkpoint: ``{"model": str, "ema": [str per rate], "opt": str, "state": str}``."""
    return {
        "model": os.path.join(folder, f"model{step:06d}.pt"),
        "ema": [os.path.join(folder, f"ema_{rate}_{step:06d}.pt") for rate in ema_rates],
        "opt": os.path.join(folder, f"opt{step:06d}.pt"),
        "state": os.path.join(folder, f"state{step:06d}.pt"),
    }


def parse_resume_step_from_filename(filename: str) -> int:
    """
    Parse filenames of the form path/to/modelNNNNNN.pt, where NNNNNN is the checkpoint's
    number of steps (the original's rule: the digits after the last "model"; 0 if none).
    """
    split = filename.split("model")
    if len(split) < 2:
        return 0
    split1 = split[-1].split(".")[0]
    try:
        return int(split1)
    except ValueError:
        return 0


def find_resume_checkpoint() -> Optional[str]:
    """Hook for infrastructure that finds checkpoints by itself; None here, as in the original."""
    return None


def find_ema_checkpoint(main_checkpoint: Optional[str], step: int, rate: float) -> Optional[str]:
    """The EMA file beside ``main_checkpoint`` for ``step`` and ``rate``, or None if absent."""
    if main_checkpoint is None:
        return None
    path = os.path.join(os.path.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if os.path.exists(path) else None


def newest_complete_checkpoint(folder: str, ema_rates: Sequence[float]) -> Optional[int]:
    """
    Step of the newest checkpoint in ``folder`` whose model, optimizer and train-state files
    exist and load (the state file is written last, so it marks a finished save). EMA files of
    the given rates are loaded when present; one missing because ``--ema_rate`` gained a rate
    does not disqualify the checkpoint (that EMA restarts from the weights). In a folder written
    by the original code (no state files at all), model and optimizer suffice. Incomplete
    checkpoints are skipped with a logged note.
    """
    if not os.path.isdir(folder):
        return None
    names = set(os.listdir(folder))
    steps = {int(n[5:-3]) for n in names if n.startswith("model") and n.endswith(".pt") and n[5:-3].isdigit()}
    original_layout = not any(n.startswith("state") and n.endswith(".pt") for n in names)
    for step in sorted(steps, reverse=True):
        files = checkpoint_files(folder, step, ema_rates)
        required = [files["model"], files["opt"]] + ([] if original_layout else [files["state"]])
        missing = [p for p in required if not os.path.isfile(p)]
        if missing:
            logger.log(f"resume: skipping incomplete checkpoint {step}: missing {os.path.basename(missing[0])}")
            continue
        saved_rates: list = []
        try:
            for path in required + [p for p in files["ema"] if os.path.isfile(p)]:
                loaded = safe_torch_load(path)
                if path == files["state"] and isinstance(loaded, dict):
                    saved_rates = [float(r) for r in loaded.get("ema_rate", [])]
        except UserError as exc:
            logger.log(f"resume: skipping checkpoint {step}: {exc}")
            continue
        lost = [p for r, p in zip(ema_rates, files["ema"]) if float(r) in saved_rates and not os.path.isfile(p)]
        if lost:  # that save wrote this EMA: its file is gone, not merely new
            logger.log(f"resume: skipping incomplete checkpoint {step}: missing {os.path.basename(lost[0])}")
            continue
        return step
    return None


# ---------------------------------------------------------------------------------------------
# random generators, sampler and data position


def get_rng_state() -> Dict[str, Any]:
    """
    torch (CPU and this rank's CUDA device), NumPy and Python generator states as tensors and
    plain numbers; ``"cuda"`` is the generator of ``dist_util.dev()`` alone (every rank saves its own).
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if dist_util.dev().type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dist_util.dev())
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`get_rng_state`; a CUDA generator state that cannot be restored is logged."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    _set_cuda_rng_state(state.get("cuda"))


def _set_cuda_rng_state(saved: Any) -> None:
    """This rank's CUDA generator from a checkpoint: one state (or, from older checkpoints, one per GPU)."""
    device = dist_util.dev()
    if isinstance(saved, (list, tuple)):  # older checkpoints: get_rng_state_all(), one per visible GPU
        index = device.index or 0
        saved = saved[index] if index < len(saved) else None
    if saved is None and device.type == "cuda":
        logger.log("resume: the checkpoint holds no CUDA generator state (saved without a GPU); it starts afresh")
    elif saved is not None and device.type != "cuda":
        logger.log("resume: the checkpoint's CUDA generator state is not restored: no GPU here")
    elif saved is not None:
        torch.cuda.set_rng_state(saved, device)


def get_sampler_state(sampler: Any) -> Dict[str, Any]:
    """A sampler's state: its ``state_dict()``, else its NumPy array attributes as tensors."""
    if hasattr(sampler, "state_dict"):
        return sampler.state_dict()
    return {k: torch.from_numpy(np.array(v)) for k, v in vars(sampler).items() if isinstance(v, np.ndarray)}


def set_sampler_state(sampler: Any, state: Dict[str, Any]) -> None:
    """Restore :func:`get_sampler_state` (arrays keep the dtype the sampler had)."""
    if hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state)
        return
    for key, value in state.items():
        old = getattr(sampler, key, None)
        dtype = old.dtype if isinstance(old, np.ndarray) else None
        setattr(sampler, key, value.numpy().astype(dtype) if dtype is not None else value.numpy())


def _rank_state(sampler: Any, data: Any, val_data: Any = None) -> Dict[str, Any]:
    """This rank's generators, sampler history and data positions (training and validation)."""
    return {
        "rng": get_rng_state(),
        "sampler": get_sampler_state(sampler) if sampler is not None else {},
        "data": data.state_dict() if hasattr(data, "state_dict") else None,
        "val_data": val_data.state_dict() if hasattr(val_data, "state_dict") else None,
    }


def _restore_rank_state(mine: Dict[str, Any], sampler: Any, data: Any, val_data: Any = None) -> None:
    set_rng_state(mine["rng"])
    if sampler is not None:
        set_sampler_state(sampler, mine.get("sampler", {}))
    for key, loader in (("data", data), ("val_data", val_data)):
        if hasattr(loader, "load_state_dict") and mine.get(key) is not None:
            loader.load_state_dict(mine[key])
        elif mine.get(key) is not None:
            logger.log(f"resume: the {key} iterator has no load_state_dict; its order starts afresh")


# ---------------------------------------------------------------------------------------------
# save / resume


@dataclasses.dataclass
class TrainingState:
    """
    What a trainer checkpoints: the model, its optimizer, EMA copies of its parameters (one
    list per rate, in ``model.parameters()`` order), and optionally the timestep sampler and
    the data iterator whose states are saved per rank.
    """

    model: nn.Module
    opt: torch.optim.Optimizer
    ema_rates: Sequence[float] = ()
    ema_params: Sequence[Sequence[torch.Tensor]] = ()
    sampler: Any = None
    data: Any = None
    val_data: Any = None

    def ema_state_dict(self, index: int) -> Dict[str, torch.Tensor]:
        """The model's state_dict with the EMA weights of ``ema_rates[index]`` in place."""
        state_dict = self.model.state_dict()
        for (name, _), value in zip(self.model.named_parameters(), self.ema_params[index]):
            state_dict[name] = value
        return state_dict


def save(folder: str, step: int, training: TrainingState, extra: Optional[Dict[str, Any]] = None) -> None:
    """
    Write model, EMA, optimizer and train-state files for ``step`` (rank 0 writes, every rank
    must call: each contributes its generators), the state file last. A failed write (e.g. a
    full disk) removes this step's files, leaves earlier checkpoints intact and raises the same
    UserError on every rank.

    :param extra: trainer-specific entries of the train-state file (plain tensors and numbers).
    """
    state = {
        "version": STATE_VERSION,
        "step": step,
        "ema_rate": [float(r) for r in training.ema_rates],
        **(extra or {}),
        "ranks": dist_util.gather_objects(_rank_state(training.sampler, training.data, training.val_data)),
    }
    files = checkpoint_files(folder, step, training.ema_rates)
    error = dist_util.decided_by_rank0(lambda: _write_checkpoint(files, training, state))
    if error:
        raise UserError(f"{error}; training stopped at step {step}, earlier checkpoints are intact")
    logger.log(f"saved checkpoint for step {step} in {folder}")


def _write_checkpoint(files: Dict[str, Any], training: TrainingState, state: Dict[str, Any]) -> Optional[str]:
    writes = [(files["model"], lambda: training.model.state_dict())]
    writes += [(path, lambda i=i: training.ema_state_dict(i)) for i, path in enumerate(files["ema"])]
    writes += [(files["opt"], lambda: training.opt.state_dict()), (files["state"], lambda: state)]
    try:
        for path, make in writes:
            atomic_torch_save(make(), path)
    except UserError as exc:
        for path, _ in writes:
            remove_quietly(path)
        return str(exc)
    return None


def resume(resume_checkpoint: str, folder: str, training: TrainingState) -> Tuple[Optional[int], Dict[str, Any]]:
    """
    Load a checkpoint into ``training`` (every rank; files are read once, on rank 0).

    :param resume_checkpoint: ``""`` (start afresh), a ``modelNNNNNN.pt`` path, or ``"auto"``:
        the newest complete checkpoint in ``folder`` (none: start afresh).
    :param folder: the trainer's log folder; temporaries of saves killed mid-write are removed.
    :return: the number of steps the checkpoint holds (None when starting afresh) and the
        shared entries of its train-state file (``{}`` when it has none).
    """
    if dist_util.get_rank() == 0:
        removed = remove_stale_temporaries(folder)
        if removed:
            logger.log(f"removed {removed} temporary file(s) of interrupted saves from {folder}")
    path, step = _resolve_resume(find_resume_checkpoint() or resume_checkpoint, folder, training.ema_rates)
    if path is None:
        return None, {}
    logger.log(f"resuming from {path} (step {step})")
    files = checkpoint_files(os.path.dirname(path), step, training.ema_rates)
    load_model_state(training.model, dist_util.load_state_dict(path, map_location="cpu"), path)
    _load_emas(training, files["ema"])
    if dist_util.decided_by_rank0(lambda: os.path.isfile(files["opt"])):
        opt_state = dist_util.load_state_dict(files["opt"], map_location="cpu")
        try:
            training.opt.load_state_dict(opt_state)
        except (ValueError, KeyError) as exc:
            raise UserError(
                f"optimizer state {files['opt']} does not fit this model ({exc}); "
                "move it away to resume with a fresh optimizer"
            ) from exc
    if not dist_util.decided_by_rank0(lambda: os.path.isfile(files["state"])):
        logger.log(f"resume: no {files['state']}; random generators and data order start afresh")
        return step, {}
    state = dist_util.load_state_dict(files["state"], map_location="cpu")
    ranks = state.pop("ranks", [])
    if len(ranks) != dist_util.get_world_size():
        logger.log(
            f"resume: {files['state']} was written by {len(ranks)} process(es), now {dist_util.get_world_size()}; "
            "random generators and data order start afresh"
        )
    else:
        _restore_rank_state(ranks[dist_util.get_rank()], training.sampler, training.data, training.val_data)
    return step, state


def _resolve_resume(resume: str, folder: str, ema_rates: Sequence[float]) -> Tuple[Optional[str], int]:
    """The model file to resume from (or None) and the number of steps it holds."""
    if not resume:
        return None, 0
    if resume == AUTO_RESUME:
        step = dist_util.decided_by_rank0(lambda: newest_complete_checkpoint(folder, ema_rates))
        if step is None:
            logger.log(f"resume: no complete checkpoint in {folder}; starting from scratch")
            return None, 0
        return checkpoint_files(folder, step, ema_rates)["model"], step
    if not dist_util.decided_by_rank0(lambda: os.path.isfile(resume)):
        raise UserError(f"--resume_checkpoint {resume}: no such file")
    return resume, parse_resume_step_from_filename(os.path.basename(resume))


def _load_emas(training: TrainingState, paths: Sequence[str]) -> None:
    """Each EMA from its file; one without a file (a new rate) restarts from the model weights."""
    named = list(training.model.named_parameters())
    for ema, path in zip(training.ema_params, paths):
        if not dist_util.decided_by_rank0(lambda p=path: os.path.isfile(p)):
            logger.log(f"resume: no {path}; that EMA restarts from the model weights")
            for e, (_, p) in zip(ema, named):
                e.copy_(p.detach())
            continue
        state_dict = dist_util.load_state_dict(path, map_location="cpu")
        for (name, _), target in zip(named, ema):
            value = state_dict.get(name)
            if value is None or value.shape != target.shape:
                found = "missing" if value is None else f"shape {tuple(value.shape)}"
                raise UserError(f"EMA checkpoint {path}: {name} is {found}, the model has {tuple(target.shape)}")
            target.copy_(value.to(target.device, torch.float32))
