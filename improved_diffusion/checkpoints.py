"""
Loading model weights with a useful error: a checkpoint that does not fit the model built from
the flags raises a one-line :class:`~improved_diffusion.errors.UserError` naming the file, the
first mismatched / missing / unexpected keys with their shapes, and the flags the checkpoint
was probably trained with, read back from the shapes of its tensors.

Checkpoints are plain ``state_dict``s in the original implementation's layout (see SPEC.md,
"Network architecture"); model, EMA and released files all load through :func:`load_model_state`.
"""

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .errors import UserError

MAX_LISTED = 3  # keys listed per kind of mismatch
# Flags shown in suggestions, in the order of the original's flag list.
_FLAG_ORDER = (
    "image_size",
    "large_size",
    "num_channels",
    "num_res_blocks",
    "learn_sigma",
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
    out channels of ``input_blocks.0.0.weight``), ``learn_sigma`` (``out.2.weight`` has 6 rows,
    not 3), ``class_cond`` (``label_emb.weight`` present), ``use_scale_shift_norm``
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
    if out is not None and int(out.shape[0]) in (3, 6):
        guess["learn_sigma"] = int(out.shape[0]) == 6
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
    size = _size_for_channel_mult(tuple(mult), super_res=in_channels == 6)
    if size is not None:
        guess["large_size" if in_channels == 6 else "image_size"] = size
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
    from .script_util import CHANNEL_MULTS, SR_CHANNEL_MULTS  # lazy: script_util imports the whole library

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
    :param state_dict: the checkpoint's tensors (original key layout).
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
    first = state_dict.get("input_blocks.0.0.weight")
    if first is not None and first.dim() >= 2 and int(first.shape[1]) == 6 and "large_size" not in (flags or {}):
        message += "; it is a super-resolution model (6 input channels): use the super_res scripts"
    message += _preset_hint(state_dict)
    message += f"; {UNSTORED_NOTE}"
    raise UserError(message)


def _preset_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'; its shapes are those of --preset NAME (file)' when a released checkpoint's architecture fits."""
    from .presets import PRESETS, matching_presets  # lazy: presets imports script_util

    names = matching_presets(guess_flags_from_state_dict(state_dict))
    if not names:
        return ""
    return "; its shapes are those of " + " or ".join(f"--preset {n} ({PRESETS[n].checkpoint})" for n in names)
