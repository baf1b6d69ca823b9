"""
Flag plumbing shared by the scripts: default dicts per flag group, argparse generated from
them, and the factories that turn flags into a model and a diffusion.

Flags become enums in exactly one place, :func:`create_gaussian_diffusion`. Library code
never sees argparse. ``args.json`` (written beside checkpoints at training) lets sampling and
NLL scripts recover the model/diffusion flags of a checkpoint (:func:`parse_args_with_saved`).
"""

import argparse
import dataclasses
import inspect
import json
import os
import sys
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

from . import gaussian_diffusion as gd
from . import logger
from . import nn as inn
from .errors import UserError
from .respace import SpacedDiffusion, space_timesteps
from .unet import CLASSIFIER_POOLS, EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000

ARGS_JSON = "args.json"

# Channel multipliers per image side. 256/64/32 are the original's, 512 and 128 guided-diffusion's
# (a level has int(mult * num_channels) channels), 28 and 16 are ours.
CHANNEL_MULTS = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    28: (1, 2, 2),
    16: (1, 2, 2),
}
# The super-resolution models' table: as above except 512, which guided's upsampler builds like 256.
SR_CHANNEL_MULTS = {**CHANNEL_MULTS, 512: (1, 1, 2, 2, 4, 4)}
# The noised classifier's fixed settings in guided-diffusion's factory [ADM §4].
CLASSIFIER_HEAD_CHANNELS = 64


def model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults of the MODEL / DIFFUSION flag group (names and values of the original)."""
    return dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        attention_resolutions="16,8",
        dropout=0.0,
        learn_sigma=False,
        sigma_small=False,
        class_cond=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        channel_mult="",
        # [ADM] architecture options (guided-diffusion's flags); these defaults are the original's network.
        num_head_channels=-1,
        resblock_updown=False,
        use_new_attention_order=False,
    )


_DIFFUSION_KEYS = (
    "learn_sigma",
    "sigma_small",
    "diffusion_steps",
    "noise_schedule",
    "timestep_respacing",
    "use_kl",
    "predict_xstart",
    "rescale_timesteps",
    "rescale_learned_sigmas",
)


def diffusion_defaults() -> Dict[str, Any]:
    """The DIFFUSION part of :func:`model_and_diffusion_defaults` (guided-diffusion's split, plus sigma_small)."""
    defaults = model_and_diffusion_defaults()
    return {k: defaults[k] for k in _DIFFUSION_KEYS}


def classifier_defaults() -> Dict[str, Any]:
    """Defaults of the noised classifier's flags, with guided-diffusion's names and values [ADM §4]."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
    )


def classifier_and_diffusion_defaults() -> Dict[str, Any]:
    """The classifier's flags plus the DIFFUSION flags (what ``classifier_train.py`` parses)."""
    return {**classifier_defaults(), **diffusion_defaults()}


def create_model_and_diffusion(
    image_size: int,
    class_cond: bool,
    learn_sigma: bool,
    sigma_small: bool,
    num_channels: int,
    num_res_blocks: int,
    num_heads: int,
    num_heads_upsample: int,
    attention_resolutions: str,
    dropout: float,
    diffusion_steps: int,
    noise_schedule: str,
    timestep_respacing: str,
    use_kl: bool,
    predict_xstart: bool,
    rescale_timesteps: bool,
    rescale_learned_sigmas: bool,
    use_checkpoint: bool,
    use_scale_shift_norm: bool,
    channel_mult: str = "",
    num_head_channels: int = -1,
    resblock_updown: bool = False,
    use_new_attention_order: bool = False,
    use_fp16: bool = False,
) -> Tuple[UNetModel, SpacedDiffusion]:
    """
    Build the UNet and the (respaced) diffusion from the MODEL / DIFFUSION flags.

    ``use_fp16`` (guided-diffusion's keyword, not a flag of this group here: training and
    sampling choose autocast with their own flags) converts the torso's weights to float16.
    """
    # The diffusion first: it validates the schedule and respacing before any weights exist.
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        channel_mult=channel_mult,
        num_head_channels=num_head_channels,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        use_fp16=use_fp16,
    )
    return model, diffusion


def channel_mult_for(
    image_size: int, channel_mult: str = "", flag: str = "image_size", table: Optional[Dict[int, Tuple]] = None
) -> Tuple[float, ...]:
    """
    Channel multipliers for a side length: the ``--channel_mult`` flag when given (e.g.
    ``"1,2,2"``, or with fractions as in [ADM]'s 512 model, ``"0.5,1,1,2,2,4,4"``), else
    ``table`` (default :data:`CHANNEL_MULTS`, for 512/256/128/64/32/28/16). Whole numbers come
    back as ints, fractions as floats; a level has ``int(mult * num_channels)`` channels.
    """
    if channel_mult:
        return _parse_channel_mult(str(channel_mult))
    table = CHANNEL_MULTS if table is None else table
    if image_size not in table:
        sizes = ", ".join(str(s) for s in sorted(table))
        raise UserError(
            f"--{flag} {image_size} has no default channel multipliers (known sizes: {sizes}); "
            "pass --channel_mult, e.g. --channel_mult 1,2,2"
        )
    return table[image_size]


def _parse_channel_mult(channel_mult: str) -> Tuple[float, ...]:
    """``"0.5,1,2"`` -> ``(0.5, 1, 2)``; anything else than positive numbers is a UserError."""
    try:
        mult = tuple(float(m) for m in channel_mult.split(","))
    except ValueError:
        raise UserError(
            f"--channel_mult {channel_mult!r}: expected comma-separated positive numbers like 1,2,2 or 0.5,1,2"
        ) from None
    if not mult or any(not m > 0 or m == float("inf") for m in mult):
        raise UserError(f"--channel_mult {channel_mult!r}: multipliers must be positive numbers")
    return tuple(int(m) if m.is_integer() else m for m in mult)


def attention_downsample_factors(
    attention_resolutions: str, image_size: int, flag: str = "attention_resolutions"
) -> Tuple[int, ...]:
    """Turn ``--attention_resolutions "16,8"`` (feature-map sides) into downsample factors."""
    factors = []
    for part in str(attention_resolutions).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            side = int(part)
        except ValueError:
            raise UserError(
                f"--{flag} {attention_resolutions!r}: expected comma-separated feature-map sides like 16,8"
            ) from None
        if side <= 0:
            raise UserError(f"--{flag} {attention_resolutions!r}: sides must be positive")
        factors.append(image_size // side)
    return tuple(factors)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise UserError(f"--{name} {value}: must be a positive integer")


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    learn_sigma: bool,
    class_cond: bool,
    use_checkpoint: bool,
    attention_resolutions: str,
    num_heads: int,
    num_heads_upsample: int,
    use_scale_shift_norm: bool,
    dropout: float,
    channel_mult: str = "",
    num_head_channels: int = -1,
    resblock_updown: bool = False,
    use_new_attention_order: bool = False,
    use_fp16: bool = False,
) -> UNetModel:
    """
    Build the attention UNet of [IDDPM App. A] from flags (3 input channels, 3 or 6 output),
    with the [ADM] options (``num_head_channels``, ``resblock_updown``, ``use_new_attention_order``;
    ``use_fp16`` converts the torso's weights to float16, prefer autocast).
    """
    return _build_unet(
        UNetModel,
        image_size,
        "image_size",
        num_channels=num_channels,
        num_res_blocks=num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        channel_mult=channel_mult,
        num_head_channels=num_head_channels,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        use_fp16=use_fp16,
    )


def _build_unet(
    cls: type,
    size: int,
    size_flag: str,
    *,
    num_channels: int,
    num_res_blocks: int,
    learn_sigma: bool,
    class_cond: bool,
    use_checkpoint: bool,
    attention_resolutions: str,
    num_heads: int,
    num_heads_upsample: int,
    use_scale_shift_norm: bool,
    dropout: float,
    channel_mult: str,
    num_head_channels: int,
    resblock_updown: bool,
    use_new_attention_order: bool,
    use_fp16: bool,
    mult_table: Optional[Dict[int, Tuple]] = None,
) -> UNetModel:
    """Validate the model flags and build ``cls`` (UNetModel or SuperResModel) for side ``size``."""
    _check_positive(**{size_flag: size}, num_channels=num_channels, num_res_blocks=num_res_blocks)
    _check_positive(num_heads=num_heads)
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--dropout {dropout}: must be in [0, 1)")
    return cls(
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_downsample_factors(attention_resolutions, size),
        dropout=dropout,
        channel_mult=channel_mult_for(size, channel_mult, flag=size_flag, table=mult_table),
        num_classes=(NUM_CLASSES if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        num_head_channels=num_head_channels,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        use_fp16=use_fp16,
    )


def sr_model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults of the super-resolution group: MODEL/DIFFUSION without image_size and sigma_small."""
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    arg_names = inspect.getfullargspec(sr_create_model_and_diffusion)[0]
    for k in list(res.keys()):
        if k not in arg_names:
            del res[k]
    return res


def sr_create_model_and_diffusion(
    large_size: int,
    small_size: int,
    class_cond: bool,
    learn_sigma: bool,
    num_channels: int,
    num_res_blocks: int,
    num_heads: int,
    num_heads_upsample: int,
    attention_resolutions: str,
    dropout: float,
    diffusion_steps: int,
    noise_schedule: str,
    timestep_respacing: str,
    use_kl: bool,
    predict_xstart: bool,
    rescale_timesteps: bool,
    rescale_learned_sigmas: bool,
    use_checkpoint: bool,
    use_scale_shift_norm: bool,
    channel_mult: str = "",
    num_head_channels: int = -1,
    resblock_updown: bool = False,
    use_new_attention_order: bool = False,
    use_fp16: bool = False,
) -> Tuple[SuperResModel, SpacedDiffusion]:
    """Build the super-resolution UNet and its diffusion from the super-resolution flags."""
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=False,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        channel_mult=channel_mult,
        num_head_channels=num_head_channels,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        use_fp16=use_fp16,
    )
    return model, diffusion


def sr_create_model(
    large_size: int,
    small_size: int,
    num_channels: int,
    num_res_blocks: int,
    learn_sigma: bool,
    class_cond: bool,
    use_checkpoint: bool,
    attention_resolutions: str,
    num_heads: int,
    num_heads_upsample: int,
    use_scale_shift_norm: bool,
    dropout: float,
    channel_mult: str = "",
    num_head_channels: int = -1,
    resblock_updown: bool = False,
    use_new_attention_order: bool = False,
    use_fp16: bool = False,
) -> SuperResModel:
    """
    Build the super-resolution UNet (low-resolution input upsampled and concatenated), with
    the [ADM] options as in :func:`create_model`; the default multipliers come from
    :data:`SR_CHANNEL_MULTS`.
    """
    _check_positive(small_size=small_size)
    if small_size >= large_size:
        raise UserError(f"--small_size {small_size} must be smaller than --large_size {large_size}")
    return _build_unet(
        SuperResModel,
        large_size,
        "large_size",
        num_channels=num_channels,
        num_res_blocks=num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        channel_mult=channel_mult,
        num_head_channels=num_head_channels,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        use_fp16=use_fp16,
        mult_table=SR_CHANNEL_MULTS,
    )


def create_classifier(
    image_size: int,
    classifier_use_fp16: bool,
    classifier_width: int,
    classifier_depth: int,
    classifier_attention_resolutions: str,
    classifier_use_scale_shift_norm: bool,
    classifier_resblock_updown: bool,
    classifier_pool: str,
    num_classes: int = NUM_CLASSES,
    classifier_channel_mult: str = "",
) -> EncoderUNetModel:
    """
    Build the noised classifier [ADM §4] from the classifier flags, as guided-diffusion's
    factory does: heads of 64 channels, multipliers from the image-size table, 1000 classes.

    :param num_classes: logits per image (ours: guided fixes 1000).
    :param classifier_channel_mult: multipliers instead of the table (ours), e.g. ``"1,2,2"``.
    """
    check_choice("classifier_pool", classifier_pool, CLASSIFIER_POOLS)
    _check_positive(image_size=image_size, classifier_width=classifier_width, classifier_depth=classifier_depth)
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_downsample_factors(
            classifier_attention_resolutions, image_size, flag="classifier_attention_resolutions"
        ),
        channel_mult=channel_mult_for(image_size, classifier_channel_mult),
        use_fp16=classifier_use_fp16,
        num_head_channels=CLASSIFIER_HEAD_CHANNELS,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def create_classifier_and_diffusion(
    image_size: int,
    classifier_use_fp16: bool,
    classifier_width: int,
    classifier_depth: int,
    classifier_attention_resolutions: str,
    classifier_use_scale_shift_norm: bool,
    classifier_resblock_updown: bool,
    classifier_pool: str,
    learn_sigma: bool,
    diffusion_steps: int,
    noise_schedule: str,
    timestep_respacing: str,
    use_kl: bool,
    predict_xstart: bool,
    rescale_timesteps: bool,
    rescale_learned_sigmas: bool,
    sigma_small: bool = False,
) -> Tuple[EncoderUNetModel, SpacedDiffusion]:
    """Build the noised classifier and the diffusion whose x_t it classifies (guided-diffusion's factory)."""
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    classifier = create_classifier(
        image_size,
        classifier_use_fp16,
        classifier_width,
        classifier_depth,
        classifier_attention_resolutions,
        classifier_use_scale_shift_norm,
        classifier_resblock_updown,
        classifier_pool,
    )
    return classifier, diffusion


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str = "",
) -> SpacedDiffusion:
    """
    Map the diffusion flags to a :class:`SpacedDiffusion` (always the respacing subclass; an
    empty ``timestep_respacing`` keeps every step). The one place flags become enums:

    - loss: ``use_kl`` -> RESCALED_KL, else ``rescale_learned_sigmas`` -> RESCALED_MSE, else MSE;
    - mean: ``predict_xstart`` -> START_X, else EPSILON;
    - variance: ``learn_sigma`` -> LEARNED_RANGE [IDDPM Eq. 15], else ``sigma_small`` ->
      FIXED_SMALL (posterior beta-tilde), else FIXED_LARGE (beta).
    """
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=(gd.ModelMeanType.EPSILON if not predict_xstart else gd.ModelMeanType.START_X),
        model_var_type=(
            (gd.ModelVarType.FIXED_LARGE if not sigma_small else gd.ModelVarType.FIXED_SMALL)
            if not learn_sigma
            else gd.ModelVarType.LEARNED_RANGE
        ),
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


# ---------------------------------------------------------------------------------------------
# argparse plumbing


class FlagParser(argparse.ArgumentParser):
    """
    ``argparse.ArgumentParser`` whose errors are one line (``error: argument --x: ...``, exit 2)
    instead of the whole usage block; ``--help`` is unchanged. Every script uses it.
    """

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def speed_defaults() -> Dict[str, Any]:
    """
    Flags of the speed switches (:class:`improved_diffusion.nn.SpeedSwitches`, new in this
    implementation): ``--sdpa`` and ``--winograd``, on by default. ``False`` for both computes
    the network exactly as the original did (plain attention formula, direct convolutions).
    """
    return dataclasses.asdict(inn.SpeedSwitches())


def apply_speed_flags(args: argparse.Namespace) -> None:
    """Set the speed switches from the parsed flags and log them (after ``logger.configure``)."""
    inn.set_speed_switches(**args_to_dict(args, speed_defaults()))
    logger.log(inn.speed_switches_summary())


def str2bool(v: Any) -> bool:
    """Strict boolean parsing for flags: true/false, yes/no, t/f, y/n, 1/0 (any case)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    elif v.lower() in ("no", "false", "f", "n", "0"):
        return False
    else:
        raise argparse.ArgumentTypeError(f"boolean value expected (True/False, yes/no, 1/0), got {v!r}")


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Dict[str, Any]) -> None:
    """Add one ``--key`` flag per entry, typed from its default (booleans parsed strictly)."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> Dict[str, Any]:
    """Pick ``keys`` out of parsed flags."""
    return {k: getattr(args, k) for k in keys}


def check_choice(flag: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a UserError naming ``--flag``, the value and the allowed values unless value is one of them."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise UserError(f"--{flag} {value!r}: expected one of {allowed}")


def save_args_json(args: argparse.Namespace, log_dir: str) -> str:
    """Write every resolved flag to ``log_dir/args.json`` (atomically); returns its path."""
    from .fileio import atomic_save_json

    path = os.path.join(log_dir, ARGS_JSON)
    atomic_save_json(vars(args), path)
    return path


def load_args_json(model_path: str) -> Optional[Dict[str, Any]]:
    """The flags saved in ``args.json`` beside ``model_path``, or None when there is none."""
    if not model_path:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), ARGS_JSON)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not read {path}: {exc}") from exc
    if not isinstance(saved, dict):
        raise UserError(f"{path} does not hold a JSON object of flags")
    return saved


def parse_args_with_saved(
    parser: argparse.ArgumentParser,
    model_keys: Iterable[str],
    argv: Optional[Sequence[str]] = None,
    path_flag: str = "model_path",
) -> Tuple[argparse.Namespace, Dict[str, Any]]:
    """
    Parse flags; where ``args.json`` sits beside ``--model_path``, its values for ``model_keys``
    become the defaults, so a user need not repeat the training flags. Flags given on the
    command line still win.

    :return: the parsed flags and the dict of values taken from ``args.json`` (empty if none).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    first = parser.parse_args(argv)
    saved = load_args_json(getattr(first, path_flag, ""))
    if not saved:
        return first, {}
    keys = set(model_keys)
    taken = {k: v for k, v in saved.items() if k in keys}
    parser.set_defaults(**taken)
    return parser.parse_args(argv), taken
