"""
Flag plumbing shared by the scripts: default dicts per flag group, argparse generated from
them, and the factories that turn flags into a model and a diffusion.

Flags become enums in exactly one place, :func:`create_gaussian_diffusion`. Library code
never sees argparse. ``args.json`` (written beside checkpoints at training) lets sampling and
NLL scripts recover the model/diffusion flags of a checkpoint (:func:`parse_args_with_saved`).
"""

import argparse
import inspect
import json
import os
import sys
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from . import flags
from . import gaussian_diffusion as gd
from .errors import UserError
from .fileio import atomic_save_json
from .flags import speed_defaults
from .image_datasets import image_mode
from .nn import AUTO, SpeedSettings
from .presets import apply_preset_argv, get_preset, preset_flags
from .respace import SpacedDiffusion, space_timesteps
from .unet import (  # noqa: F401  (the tables and parsers stay importable from here)
    CHANNEL_MULTS,
    CLASSIFIER_POOLS,
    SR_CHANNEL_MULTS,
    EncoderUNetModel,
    SuperResModel,
    UNetModel,
    attention_downsample_factors,
    channel_mult_for,
)

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
    "num_head_channels",
    "resblock_updown",
    "use_new_attention_order",
    "use_fp16",
    "num_classes",
    "class_dropout_prob",
    "image_channels",
)
# The noised classifier's fixed settings in guided-diffusion's factory [ADM §4].
CLASSIFIER_HEAD_CHANNELS = 64
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
    "snr_gamma": "snr_gamma",
}


def model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults of the MODEL / DIFFUSION flag groups (names and values of the original)."""
    return flags.defaults_for("image_sample", (flags.MODEL, flags.DIFFUSION))


def diffusion_defaults() -> Dict[str, Any]:
    """The DIFFUSION group alone (guided-diffusion's split, plus sigma_small)."""
    return flags.defaults_for("image_sample", (flags.DIFFUSION,))


def classifier_defaults() -> Dict[str, Any]:
    """Defaults of the noised classifier's flags, with guided-diffusion's names and values [ADM §4]."""
    return flags.defaults_for("classifier_train", (flags.CLASSIFIER,))


def classifier_and_diffusion_defaults() -> Dict[str, Any]:
    """The classifier's flags plus the DIFFUSION flags (what ``classifier_train.py`` parses)."""
    return {**classifier_defaults(), **diffusion_defaults()}


def _pick(values: Mapping[str, Any], names: Iterable[str]) -> Dict[str, Any]:
    return {name: values[name] for name in names}


def _diffusion_from_flags(values: Mapping[str, Any]) -> SpacedDiffusion:
    """The diffusion of a factory's flags (those it lacks, e.g. ``sigma_small``, keep their defaults)."""
    kwargs = {key: values[flag] for flag, key in _DIFFUSION_FLAGS.items() if flag in values}
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
    num_head_channels: int = -1,
    resblock_updown: bool = False,
    use_new_attention_order: bool = False,
    use_fp16: bool = False,
    num_classes: int = NUM_CLASSES,
    class_dropout_prob: float = 0.0,
    image_channels: int = 3,
    snr_gamma: float = 0.0,
    speed: Optional[SpeedSettings] = None,
) -> Tuple[UNetModel, SpacedDiffusion]:
    """Build the UNet and the (respaced) diffusion from the MODEL / DIFFUSION flags."""
    values = locals()
    # The diffusion first: it validates the schedule and respacing before any weights exist.
    diffusion = _diffusion_from_flags(values)
    return create_model(image_size, **_pick(values, _UNET_FLAGS), speed=speed), diffusion


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
    num_classes: int = NUM_CLASSES,
    class_dropout_prob: float = 0.0,
    image_channels: int = 3,
    speed: Optional[SpeedSettings] = None,
) -> UNetModel:
    """
    Build the attention UNet of [IDDPM App. A] from flags (``image_channels`` C in, C or 2C out).

    :param speed: the network's speed settings (default: the fastest exact-enough path,
        :class:`~improved_diffusion.nn.SpeedSettings`).
    """
    return _build_unet(UNetModel, image_size, "image_size", locals(), speed)


def _build_unet(
    cls: type,
    size: int,
    size_flag: str,
    values: Mapping[str, Any],
    speed: Optional[SpeedSettings],
    mult_table: Optional[Dict[int, Tuple]] = None,
) -> UNetModel:
    """Validate the model flags in ``values`` and build ``cls`` (UNetModel or SuperResModel) for side ``size``."""
    v = _pick(values, _UNET_FLAGS)
    _check_positive(**{size_flag: size}, num_channels=v["num_channels"], num_res_blocks=v["num_res_blocks"])
    _check_positive(num_heads=v["num_heads"])
    if not 0.0 <= v["dropout"] < 1.0:
        raise UserError(f"--dropout {v['dropout']}: must be in [0, 1)")
    _check_label_flags(v["class_cond"], v["num_classes"], v["class_dropout_prob"])
    channels = v["image_channels"]
    image_mode(channels)  # an unsupported channel count is a UserError naming --image_channels
    return cls(
        in_channels=channels,
        model_channels=v["num_channels"],
        out_channels=channels * (2 if v["learn_sigma"] else 1),
        num_res_blocks=v["num_res_blocks"],
        attention_resolutions=attention_downsample_factors(v["attention_resolutions"], size),
        dropout=v["dropout"],
        channel_mult=channel_mult_for(size, v["channel_mult"], flag=size_flag, table=mult_table),
        num_classes=(v["num_classes"] if v["class_cond"] else None),
        class_dropout_prob=v["class_dropout_prob"],
        use_checkpoint=v["use_checkpoint"],
        num_heads=v["num_heads"],
        num_heads_upsample=v["num_heads_upsample"],
        use_scale_shift_norm=v["use_scale_shift_norm"],
        num_head_channels=v["num_head_channels"],
        resblock_updown=v["resblock_updown"],
        use_new_attention_order=v["use_new_attention_order"],
        use_fp16=v["use_fp16"],
        speed=speed,
    )


def _check_label_flags(class_cond: bool, num_classes: int, class_dropout_prob: float) -> None:
    """``--num_classes`` positive; ``--class_dropout_prob`` in [0, 1), and only for a class-conditional model."""
    if class_cond:
        _check_positive(num_classes=num_classes)
    if not 0.0 <= class_dropout_prob < 1.0:
        raise UserError(f"--class_dropout_prob {class_dropout_prob}: must be in [0, 1)")
    if class_dropout_prob > 0 and not class_cond:
        raise UserError(
            f"--class_dropout_prob {class_dropout_prob} drops class labels: it needs a class-conditional "
            "model (--class_cond True)"
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
    num_head_channels: int = -1,
    resblock_updown: bool = False,
    use_new_attention_order: bool = False,
    use_fp16: bool = False,
    num_classes: int = NUM_CLASSES,
    class_dropout_prob: float = 0.0,
    image_channels: int = 3,
    snr_gamma: float = 0.0,
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
    num_head_channels: int = -1,
    resblock_updown: bool = False,
    use_new_attention_order: bool = False,
    use_fp16: bool = False,
    num_classes: int = NUM_CLASSES,
    class_dropout_prob: float = 0.0,
    image_channels: int = 3,
    speed: Optional[SpeedSettings] = None,
) -> SuperResModel:
    """Build the super-resolution UNet (low-resolution input upsampled and concatenated)."""
    _check_positive(small_size=small_size)
    if small_size >= large_size:
        raise UserError(f"--small_size {small_size} must be smaller than --large_size {large_size}")
    return _build_unet(SuperResModel, large_size, "large_size", locals(), speed, SR_CHANNEL_MULTS)


def create_classifier(
    image_size: int,
    classifier_use_fp16: bool,
    classifier_width: int,
    classifier_depth: int,
    classifier_attention_resolutions: str,
    classifier_use_scale_shift_norm: bool,
    classifier_resblock_updown: bool,
    classifier_pool: str,
    classifier_num_classes: int = NUM_CLASSES,
    classifier_image_channels: int = 3,
    classifier_channel_mult: str = "",
    speed: Optional[SpeedSettings] = None,
) -> EncoderUNetModel:
    """
    Build the noised classifier [ADM §4] from the classifier flags, as guided-diffusion's
    factory does: heads of 64 channels, multipliers from the image-size table, 1000 classes
    and RGB images by default.

    :param classifier_num_classes: logits per image (ours: guided fixes 1000).
    :param classifier_image_channels: channels of its input images (ours: guided fixes 3).
    :param classifier_channel_mult: multipliers instead of the table (ours), e.g. ``"1,2,2"``.
    :param speed: the network's speed settings (ours; default as for :func:`create_model`).
    """
    check_choice("classifier_pool", classifier_pool, CLASSIFIER_POOLS)
    _check_positive(
        image_size=image_size,
        classifier_width=classifier_width,
        classifier_depth=classifier_depth,
        classifier_num_classes=classifier_num_classes,
    )
    image_mode(classifier_image_channels, flag="classifier_image_channels")
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=classifier_image_channels,
        model_channels=classifier_width,
        out_channels=classifier_num_classes,
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
        speed=speed,
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
    classifier_num_classes: int = NUM_CLASSES,
    classifier_image_channels: int = 3,
    speed: Optional[SpeedSettings] = None,
) -> Tuple[EncoderUNetModel, SpacedDiffusion]:
    """Build the noised classifier and the diffusion whose x_t it classifies (guided-diffusion's factory)."""
    values = locals()
    diffusion = _diffusion_from_flags(values)
    classifier = create_classifier(
        image_size,
        classifier_use_fp16,
        classifier_width,
        classifier_depth,
        classifier_attention_resolutions,
        classifier_use_scale_shift_norm,
        classifier_resblock_updown,
        classifier_pool,
        classifier_num_classes,
        classifier_image_channels,
        speed=speed,
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
    snr_gamma: float = 0.0,
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
        snr_gamma=snr_gamma,
    )


# ---------------------------------------------------------------------------------------------
# argparse plumbing


class FlagParser(argparse.ArgumentParser):
    """
    ``argparse.ArgumentParser`` whose errors are one line (``error: argument --x: ...``, exit 2)
    instead of the whole usage block; ``--help`` is unchanged. Every script uses it.

    ``--preset NAME`` (a released checkpoint's flags, :mod:`.presets`) expands before parsing
    into the preset's flags this parser knows, placed first so flags given on the command line
    win; ``--preset list`` prints the presets and exits.
    """

    def __init__(self, *args: Any, presets: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.presets = presets

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if self.presets:
            argv = apply_preset_argv(argv, [action.dest for action in self._actions])
        return super().parse_known_args(argv, namespace)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def create_preset_model(name: str) -> Any:
    """
    The network a preset names, built by the factory of its kind from :func:`preset_flags`
    (``create_model``, ``sr_create_model`` or ``create_classifier``). Wrap the call in
    ``with torch.device("meta"):`` to count parameters without allocating the weights.
    """
    factory = {"model": create_model, "super_res": sr_create_model, "classifier": create_classifier}[
        get_preset(name).kind
    ]
    values = preset_flags(name)
    return factory(**{k: v for k, v in values.items() if k in inspect.signature(factory).parameters})


def speed_from_args(args: argparse.Namespace) -> SpeedSettings:
    """
    The network's :class:`~improved_diffusion.nn.SpeedSettings` from the SPEED flags. With
    ``--deterministic``, ``--winograd auto`` becomes the fixed size rule: a choice by timing can
    differ between two runs, and with it the float rounding.
    """
    settings = args_to_dict(args, speed_defaults())
    if getattr(args, "deterministic", False) and settings["winograd"] == AUTO:
        settings["winograd"] = True
    return SpeedSettings(**settings)


def script_parser(script: str, doc: str, positionals: Sequence[Tuple[str, str]] = ()) -> FlagParser:
    """
    The parser of ``scripts/{script}.py``: its flag groups from :mod:`.flags` as argparse
    argument groups, each flag with one line of help, allowed values and default; ``--preset``
    for the scripts that build a network.

    :param script: e.g. ``"image_train"``.
    :param doc: the script's module docstring; its first line is the description.
    :param positionals: ``(name, help)`` of positional arguments, in order (``image_evaluate``'s REF SAMPLES).
    """
    with_presets = script in flags.NETWORK_SCRIPTS
    usage = " ".join(["%(prog)s", *(name.upper() for name, _ in positionals)])
    usage += " [--preset NAME] [--FLAG VALUE ...]" if with_presets else " [--FLAG VALUE ...]"
    parser = FlagParser(description=doc.strip().splitlines()[0], usage=usage, presets=with_presets)
    for name, help_text in positionals:
        parser.add_argument(name, help=help_text)
    if with_presets:
        presets = parser.add_argument_group("PRESET", "the flags of a released checkpoint of either original")
        presets.add_argument(
            "--preset",
            metavar="NAME",
            default=argparse.SUPPRESS,
            help="e.g. adm-imagenet64; flags given here win; --preset list prints every preset",
        )
    for group, group_flags in flags.flags_for(script):
        section = parser.add_argument_group(group.title, group.description)
        for flag in group_flags:
            _add_flag(section, flag.name, flag.default, flag.help_line(), auto=flag.auto)
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


def str2bool_or_auto(v: Any) -> Any:
    """:func:`str2bool`, or the string ``"auto"``."""
    if isinstance(v, str) and v.lower() == AUTO:
        return AUTO
    try:
        return str2bool(v)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"True, False or auto expected, got {v!r}") from None


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Dict[str, Any]) -> None:
    """Add one ``--key`` flag per entry, typed from its default (booleans parsed strictly)."""
    for k, v in default_dict.items():
        _add_flag(parser, k, v)


def _add_flag(parser: Any, name: str, default: Any, help: Optional[str] = None, auto: bool = False) -> None:
    """``--name`` typed from its default (booleans parsed strictly by :func:`str2bool`; with
    ``auto`` also the word ``auto``)."""
    v_type = str if default is None else str2bool if isinstance(default, bool) else type(default)
    v_type = str2bool_or_auto if auto else v_type
    metavar = {bool: "BOOL", int: "INT", float: "FLOAT"}.get(type(default), "STR") if help else None
    metavar = "BOOL|auto" if auto and help else metavar
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
