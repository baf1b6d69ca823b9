"""
Flag plumbing shared by the scripts: default dicts per flag group, argparse generated from
them, and the factories that turn flags into a model and a diffusion.

Flags become enums in exactly one place, :func:`create_gaussian_diffusion`. Library code
never sees argparse. ``args.json`` (written beside checkpoints at training) lets sampling and
NLL scripts recover the model/diffusion flags of a checkpoint (:func:`parse_args_with_saved`).
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from . import flags
from . import gaussian_diffusion as gd
from .errors import UserError
from .fileio import atomic_save_json
from .flags import speed_defaults
from .nn import SpeedSettings
from .respace import SpacedDiffusion, space_timesteps
from .unet import CHANNEL_MULTS, SuperResModel, UNetModel

NUM_CLASSES = 1000

ARGS_JSON = "args.json"

# The flags of the network (besides its size flag), in the original's order: the keyword
# arguments every model factory below takes.
_UNET_FLAGS = (
    "num_channels",
    "num_res_blocks",
    "learn_sigma",
    "class_cond",
    "use_checkpoint",
    "attention_resolutions",
    "num_heads",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "dropout",
    "channel_mult",
)
# Diffusion flag -> create_gaussian_diffusion keyword.
_DIFFUSION_FLAGS = {
    "diffusion_steps": "steps",
    "learn_sigma": "learn_sigma",
    "sigma_small": "sigma_small",
    "noise_schedule": "noise_schedule",
    "use_kl": "use_kl",
    "predict_xstart": "predict_xstart",
    "rescale_timesteps": "rescale_timesteps",
    "rescale_learned_sigmas": "rescale_learned_sigmas",
    "timestep_respacing": "timestep_respacing",
}


def model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults of the MODEL / DIFFUSION flag groups (names and values of the original)."""
    return flags.defaults_for("image_sample", (flags.MODEL, flags.DIFFUSION))


def _pick(values: Mapping[str, Any], names: Iterable[str]) -> Dict[str, Any]:
    return {name: values[name] for name in names}


def _diffusion_from_flags(values: Mapping[str, Any]) -> SpacedDiffusion:
    """The diffusion of a factory's flags (``sigma_small`` False where the factory has none)."""
    kwargs = {key: values.get(flag, False) for flag, key in _DIFFUSION_FLAGS.items()}
    return create_gaussian_diffusion(**kwargs)


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
    speed: Optional[SpeedSettings] = None,
) -> Tuple[UNetModel, SpacedDiffusion]:
    """Build the UNet and the (respaced) diffusion from the MODEL / DIFFUSION flags."""
    values = locals()
    # The diffusion first: it validates the schedule and respacing before any weights exist.
    diffusion = _diffusion_from_flags(values)
    return create_model(image_size, **_pick(values, _UNET_FLAGS), speed=speed), diffusion


def channel_mult_for(image_size: int, channel_mult: str = "", flag: str = "image_size") -> Tuple[int, ...]:
    """
    Channel multipliers for a side length: the ``--channel_mult`` flag when given
    (e.g. ``"1,2,2"``), else the table for 256/128/64/32/28/16.
    """
    if channel_mult:
        try:
            mult = tuple(int(m) for m in str(channel_mult).split(","))
        except ValueError:
            raise UserError(
                f"--channel_mult {channel_mult!r}: expected comma-separated positive integers like 1,2,2"
            ) from None
        if not mult or any(m <= 0 for m in mult):
            raise UserError(f"--channel_mult {channel_mult!r}: multipliers must be positive integers")
        return mult
    if image_size not in CHANNEL_MULTS:
        sizes = ", ".join(str(s) for s in sorted(CHANNEL_MULTS))
        raise UserError(
            f"--{flag} {image_size} has no default channel multipliers (known sizes: {sizes}); "
            "pass --channel_mult, e.g. --channel_mult 1,2,2"
        )
    return CHANNEL_MULTS[image_size]


def attention_downsample_factors(attention_resolutions: str, image_size: int) -> Tuple[int, ...]:
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
                f"--attention_resolutions {attention_resolutions!r}: expected comma-separated "
                "feature-map sides like 16,8"
            ) from None
        if side <= 0:
            raise UserError(f"--attention_resolutions {attention_resolutions!r}: sides must be positive")
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
    speed: Optional[SpeedSettings] = None,
) -> UNetModel:
    """
    Build the attention UNet of [IDDPM App. A] from flags (3 input channels, 3 or 6 output).

    :param speed: the network's speed settings (default: the fastest exact-enough path,
        :class:`~improved_diffusion.nn.SpeedSettings`).
    """
    return _build_unet(UNetModel, image_size, "image_size", locals(), speed)


def _build_unet(
    cls: type, size: int, size_flag: str, values: Mapping[str, Any], speed: Optional[SpeedSettings]
) -> UNetModel:
    """Validate the model flags in ``values`` and build ``cls`` (UNetModel or SuperResModel) for side ``size``."""
    v = _pick(values, _UNET_FLAGS)
    _check_positive(**{size_flag: size}, num_channels=v["num_channels"], num_res_blocks=v["num_res_blocks"])
    _check_positive(num_heads=v["num_heads"])
    if not 0.0 <= v["dropout"] < 1.0:
        raise UserError(f"--dropout {v['dropout']}: must be in [0, 1)")
    return cls(
        in_channels=3,
        model_channels=v["num_channels"],
        out_channels=(3 if not v["learn_sigma"] else 6),
        num_res_blocks=v["num_res_blocks"],
        attention_resolutions=attention_downsample_factors(v["attention_resolutions"], size),
        dropout=v["dropout"],
        channel_mult=channel_mult_for(size, v["channel_mult"], flag=size_flag),
        num_classes=(NUM_CLASSES if v["class_cond"] else None),
        use_checkpoint=v["use_checkpoint"],
        num_heads=v["num_heads"],
        num_heads_upsample=v["num_heads_upsample"],
        use_scale_shift_norm=v["use_scale_shift_norm"],
        speed=speed,
    )


def sr_model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults of the super-resolution group: MODEL/DIFFUSION without image_size and sigma_small."""
    return flags.defaults_for("super_res_sample", (flags.MODEL, flags.DIFFUSION))


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
    speed: Optional[SpeedSettings] = None,
) -> Tuple[SuperResModel, SpacedDiffusion]:
    """Build the super-resolution UNet and its diffusion from the super-resolution flags."""
    values = locals()
    diffusion = _diffusion_from_flags(values)
    return sr_create_model(large_size, small_size, **_pick(values, _UNET_FLAGS), speed=speed), diffusion


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
    speed: Optional[SpeedSettings] = None,
) -> SuperResModel:
    """Build the super-resolution UNet (low-resolution input upsampled and concatenated)."""
    _check_positive(small_size=small_size)
    if small_size >= large_size:
        raise UserError(f"--small_size {small_size} must be smaller than --large_size {large_size}")
    return _build_unet(SuperResModel, large_size, "large_size", locals(), speed)


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
    if noise_schedule == "linear":
        gd.check_linear_steps(steps)
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


def speed_from_args(args: argparse.Namespace) -> SpeedSettings:
    """The network's :class:`~improved_diffusion.nn.SpeedSettings` from the SPEED flags."""
    return SpeedSettings(**args_to_dict(args, speed_defaults()))


def script_parser(script: str, doc: str) -> FlagParser:
    """
    The parser of ``scripts/{script}.py``: its flag groups from :mod:`.flags` as argparse
    argument groups, each flag with one line of help, allowed values and default.

    :param script: e.g. ``"image_train"``.
    :param doc: the script's module docstring; its first line is the description.
    """
    parser = FlagParser(description=doc.strip().splitlines()[0], usage="%(prog)s [--FLAG VALUE ...]")
    for group, group_flags in flags.flags_for(script):
        section = parser.add_argument_group(group.title, group.description)
        for flag in group_flags:
            _add_flag(section, flag.name, flag.default, flag.help_line())
    return parser


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
        _add_flag(parser, k, v)


def _add_flag(parser: Any, name: str, default: Any, help: Optional[str] = None) -> None:
    """``--name`` typed from its default (booleans parsed strictly by :func:`str2bool`)."""
    v_type = str if default is None else str2bool if isinstance(default, bool) else type(default)
    metavar = {bool: "BOOL", int: "INT", float: "FLOAT"}.get(type(default), "STR") if help else None
    parser.add_argument(f"--{name}", default=default, type=v_type, help=help, metavar=metavar)


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
