"""
Presets: the MODEL / DIFFUSION (and classifier) flags of the released checkpoints of both
originals, improved-diffusion [IDDPM] and guided-diffusion [ADM], so that ``--preset NAME``
replaces a line of flags that must match the weights exactly. Loading a released checkpoint
with other flags either fails on shapes or, for flags the weights do not show
(``rescale_timesteps``, ``use_new_attention_order``, ``num_head_channels``), silently gives
noise; a preset fixes all of them at once.

Flag values are those of the originals' READMEs (SPEC.md and SPEC_GUIDED.md); everything
else is the defaults of the original that trained the checkpoint. guided-diffusion's defaults
differ from improved-diffusion's (ours) in ``rescale_timesteps`` and ``rescale_learned_sigmas``
(both False there), which its presets therefore set. ``docs/checkpoints.md`` lists every
preset with a sample command, its parameter count and the guidance scale its paper used.

Scripts call :func:`apply_preset_argv` on their command line before argparse: the preset's
flags are inserted before the user's, so flags given on the command line win.
"""

import dataclasses
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, TextIO

from . import flags as flag_table
from .errors import UserError
from .unet import SR_CHANNEL_MULTS, attention_downsample_factors, channel_mult_for

IMPROVED = "improved-diffusion"
GUIDED = "guided-diffusion"
KINDS = ("model", "super_res", "classifier")

# guided-diffusion's diffusion defaults where they differ from improved-diffusion's (SPEC_GUIDED).
GUIDED_DIFFUSION_DEFAULTS = dict(rescale_timesteps=False, rescale_learned_sigmas=False)
# Shared by every guided-diffusion diffusion model and upsampler (its README).
_ADM_COMMON = dict(
    diffusion_steps=1000,
    learn_sigma=True,
    resblock_updown=True,
    use_scale_shift_norm=True,
    attention_resolutions="32,16,8",
)
_ADM_256 = dict(image_size=256, noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2)
_IDDPM_64 = dict(
    image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True, diffusion_steps=4000, noise_schedule="cosine"
)
_IDDPM_CIFAR = dict(_IDDPM_64, image_size=32, dropout=0.3)
_IDDPM_LSUN = dict(
    image_size=256,
    num_channels=128,
    num_res_blocks=2,
    num_heads=1,
    learn_sigma=True,
    use_scale_shift_norm=False,
    attention_resolutions="16",
    diffusion_steps=1000,
    noise_schedule="linear",
    rescale_learned_sigmas=False,
    rescale_timesteps=False,
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """
    One released checkpoint.

    :param name: the ``--preset`` value.
    :param checkpoint: the released file name.
    :param original: ``"improved-diffusion"`` or ``"guided-diffusion"``, whose defaults fill the rest.
    :param kind: ``"model"`` (image scripts), ``"super_res"`` (super-resolution scripts) or
        ``"classifier"`` (the noised classifier).
    :param flags: the flags its README gives (the rest are the original's defaults).
    :param description: one line for ``--preset list``.
    :param classifier_scale: the guidance scale of its README's sampling command (None: no classifier).
    :param classifier: the preset of the classifier that guides it (None: none).
    :param use_fp16: whether its README trained/sampled it with guided's ``--use_fp16`` (not a
        model flag here: use autocast through the scripts' precision flags).
    """

    name: str
    checkpoint: str
    original: str
    kind: str
    flags: Mapping[str, Any]
    description: str
    classifier_scale: Optional[float] = None
    classifier: Optional[str] = None
    use_fp16: bool = False


def _adm(name: str, checkpoint: str, description: str, **flags: Any) -> Preset:
    """A guided-diffusion diffusion model (its README's common flags plus ``flags``)."""
    options = {k: flags.pop(k) for k in ("classifier_scale", "classifier", "use_fp16", "kind") if k in flags}
    return Preset(
        name, checkpoint, GUIDED, options.pop("kind", "model"), {**_ADM_COMMON, **flags}, description, **options
    )


def _adm_classifier(size: int, **flags: Any) -> Preset:
    """A guided-diffusion noised classifier: its flags at their defaults except ``flags``, for the model it guides."""
    schedule = "cosine" if size == 64 else "linear"
    return Preset(
        f"adm-classifier{size}",
        f"{size}x{size}_classifier.pt",
        GUIDED,
        "classifier",
        dict(image_size=size, diffusion_steps=1000, learn_sigma=True, noise_schedule=schedule, **flags),
        f"ImageNet {size}x{size} noised classifier (guides adm-imagenet{size})",
    )


_PRESETS: List[Preset] = [
    Preset(
        "iddpm-imagenet64-uncond",
        "imagenet64_uncond_100M_1500K.pt",
        IMPROVED,
        "model",
        _IDDPM_64,
        "ImageNet 64x64 unconditional, hybrid loss",
    ),
    Preset(
        "iddpm-imagenet64-uncond-vlb",
        "imagenet64_uncond_vlb_100M_1500K.pt",
        IMPROVED,
        "model",
        dict(_IDDPM_64, use_kl=True),
        "ImageNet 64x64 unconditional, L_vlb",
    ),
    Preset(
        "iddpm-cifar10-uncond",
        "cifar10_uncond_50M_500K.pt",
        IMPROVED,
        "model",
        _IDDPM_CIFAR,
        "CIFAR-10 unconditional, hybrid loss",
    ),
    Preset(
        "iddpm-cifar10-uncond-vlb",
        "cifar10_uncond_vlb_50M_500K.pt",
        IMPROVED,
        "model",
        dict(_IDDPM_CIFAR, use_kl=True),
        "CIFAR-10 unconditional, L_vlb",
    ),
    Preset(
        "iddpm-imagenet64-cond",
        "imagenet64_cond_270M_250K.pt",
        IMPROVED,
        "model",
        dict(
            _IDDPM_64,
            num_channels=192,
            class_cond=True,
            rescale_learned_sigmas=False,
            rescale_timesteps=False,
        ),
        "ImageNet 64x64 class-conditional",
    ),
    Preset(
        "iddpm-upsample64-256-cond",
        "upsample_cond_500K.pt",
        IMPROVED,
        "super_res",
        dict(
            large_size=256,
            small_size=64,
            num_channels=192,
            num_res_blocks=2,
            learn_sigma=True,
            class_cond=True,
            diffusion_steps=4000,
            noise_schedule="linear",
            rescale_learned_sigmas=False,
            rescale_timesteps=False,
        ),
        "ImageNet 64 -> 256 class-conditional upsampler",
    ),
    Preset(
        "iddpm-lsun-uncond-bs128",
        "lsun_uncond_100M_1200K_bs128.pt",
        IMPROVED,
        "model",
        _IDDPM_LSUN,
        "LSUN 256x256 unconditional (batch 128, 1.2M steps)",
    ),
    Preset(
        "iddpm-lsun-uncond-bs64",
        "lsun_uncond_100M_2400K_bs64.pt",
        IMPROVED,
        "model",
        _IDDPM_LSUN,
        "LSUN 256x256 unconditional (batch 64, 2.4M steps)",
    ),
    _adm(
        "adm-imagenet64",
        "64x64_diffusion.pt",
        "ImageNet 64x64 class-conditional ADM",
        class_cond=True,
        dropout=0.1,
        image_size=64,
        noise_schedule="cosine",
        num_channels=192,
        num_head_channels=64,
        num_res_blocks=3,
        use_new_attention_order=True,
        use_fp16=True,
        classifier_scale=1.0,
        classifier="adm-classifier64",
    ),
    _adm(
        "adm-imagenet128",
        "128x128_diffusion.pt",
        "ImageNet 128x128 class-conditional ADM",
        class_cond=True,
        image_size=128,
        noise_schedule="linear",
        num_channels=256,
        num_heads=4,
        num_res_blocks=2,
        use_fp16=True,
        classifier_scale=0.5,
        classifier="adm-classifier128",
    ),
    _adm(
        "adm-imagenet256",
        "256x256_diffusion.pt",
        "ImageNet 256x256 class-conditional ADM",
        class_cond=True,
        **_ADM_256,
        use_fp16=True,
        classifier_scale=1.0,
        classifier="adm-classifier256",
    ),
    _adm(
        "adm-imagenet256-uncond",
        "256x256_diffusion_uncond.pt",
        "ImageNet 256x256 unconditional ADM (guided by the 256 classifier)",
        class_cond=False,
        **_ADM_256,
        use_fp16=True,
        classifier_scale=10.0,
        classifier="adm-classifier256",
    ),
    _adm(
        "adm-imagenet512",
        "512x512_diffusion.pt",
        "ImageNet 512x512 class-conditional ADM",
        class_cond=True,
        **dict(_ADM_256, image_size=512),
        classifier_scale=4.0,
        classifier="adm-classifier512",
    ),
    _adm(
        "adm-upsample64-256",
        "64_256_upsampler.pt",
        "ImageNet 64 -> 256 class-conditional upsampler (ADM-U)",
        kind="super_res",
        class_cond=True,
        large_size=256,
        small_size=64,
        noise_schedule="linear",
        num_channels=192,
        num_heads=4,
        num_res_blocks=2,
        use_fp16=True,
    ),
    _adm(
        "adm-upsample128-512",
        "128_512_upsampler.pt",
        "ImageNet 128 -> 512 class-conditional upsampler (ADM-U)",
        kind="super_res",
        attention_resolutions="32,16",
        class_cond=True,
        large_size=512,
        small_size=128,
        noise_schedule="linear",
        num_channels=192,
        num_head_channels=64,
        num_res_blocks=2,
        use_fp16=True,
    ),
    *[
        _adm(
            f"adm-lsun-{category}",
            f"lsun_{category}.pt",
            f"LSUN {category} 256x256 unconditional ADM",
            class_cond=False,
            dropout=0.1,
            **_ADM_256,
            use_fp16=True,
        )
        for category in ("bedroom", "cat", "horse")
    ],
    _adm_classifier(64, classifier_depth=4),
    _adm_classifier(128),
    _adm_classifier(256),
    _adm_classifier(512),
]

PRESETS: Dict[str, Preset] = {preset.name: preset for preset in _PRESETS}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a one-line UserError listing the known ones."""
    if name not in PRESETS:
        known = ", ".join(PRESETS)
        raise UserError(f"--preset {name!r}: unknown preset (known: {known}; --preset list describes them)")
    return PRESETS[name]


def preset_flags(name: str) -> Dict[str, Any]:
    """
    Every flag a preset determines: the defaults of its kind's flag groups (MODEL/DIFFUSION,
    super-resolution or classifier+DIFFUSION), with guided-diffusion's diffusion defaults for
    its checkpoints, then the README's flags. A diffusion model guided by a classifier also
    gets that classifier's flags and its README's ``classifier_scale``.
    """
    preset = get_preset(name)
    groups = {
        "model": ("image_sample", (flag_table.MODEL, flag_table.DIFFUSION)),
        "super_res": ("super_res_sample", (flag_table.MODEL, flag_table.DIFFUSION)),
        "classifier": ("classifier_train", (flag_table.CLASSIFIER, flag_table.DIFFUSION)),
    }[preset.kind]
    base = flag_table.defaults_for(*groups)
    if preset.original == GUIDED:
        base.update(GUIDED_DIFFUSION_DEFAULTS)
    if preset.classifier is not None:
        classifier = get_preset(preset.classifier)
        base.update(flag_table.defaults_for("classifier_train", (flag_table.CLASSIFIER,)))
        base.update({k: v for k, v in classifier.flags.items() if k.startswith("classifier_")})
        base["classifier_scale"] = preset.classifier_scale
    base.update(preset.flags)
    return base


def apply_preset(flags: Mapping[str, Any], name: str, given: Iterable[str] = ()) -> Dict[str, Any]:
    """
    ``flags`` with the preset's values for the keys it has, except the keys in ``given``
    (flags given explicitly on the command line win). Keys the preset does not set keep
    their values; the preset's keys that ``flags`` lacks are ignored.

    :param flags: a flag dict (e.g. ``vars(args)`` or a defaults dict).
    :param given: the flags given explicitly, which keep their values.
    :return: a new dict.
    """
    values, given = preset_flags(name), set(given)
    return {k: (values[k] if k in values and k not in given else v) for k, v in flags.items()}


def _flag_text(value: Any) -> str:
    return str(value)  # booleans as True/False, which the strict parser reads back


def _find_preset(argv: Sequence[str]) -> Optional[tuple]:
    """``(index, tokens, name)`` of the last ``--preset NAME`` / ``--preset=NAME`` in argv, else None."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--preset":
            if i + 1 >= len(argv):
                raise UserError("--preset needs a name (--preset list prints them)")
            found = (i, 2, argv[i + 1])
        elif arg.startswith("--preset="):
            found = (i, 1, arg.split("=", 1)[1])
    return found


def apply_preset_argv(argv: Sequence[str], known_flags: Iterable[str], out: Optional[TextIO] = None) -> List[str]:
    """
    Expand ``--preset NAME`` in a command line before argparse sees it: the preset's flags
    that the script knows (``known_flags``) are put first, then the rest of ``argv``, so that
    flags given on the command line win (argparse keeps the last value). ``--preset list``
    prints the presets to ``out`` (stdout) and exits with status 0.

    :param argv: the command line without the program name, e.g. ``sys.argv[1:]``.
    :param known_flags: the flag names the script's parser accepts (without ``--``).
    :return: the new argv; unchanged when there is no ``--preset``.
    """
    argv = list(argv)
    found = _find_preset(argv)
    if found is None:
        return argv
    index, width, name = found
    if name == "list":
        print(format_preset_list(), file=out or sys.stdout)
        raise SystemExit(0)
    rest = [arg for i, arg in enumerate(argv) if not index <= i < index + width]
    rest = [arg for arg in rest if arg != "--preset" and not arg.startswith("--preset=")]
    known = set(known_flags)
    values = preset_flags(name)
    inserted = [token for k, v in values.items() if k in known for token in (f"--{k}", _flag_text(v))]
    return inserted + rest


def format_preset_list() -> str:
    """One line per preset: name, released file, original and description (``--preset list``)."""
    width = max(len(name) for name in PRESETS)
    lines = [f"{p.name:<{width}}  {p.checkpoint:<34} {p.original:<18} {p.kind:<10} {p.description}" for p in _PRESETS]
    return "\n".join(lines)


def matching_presets(guess: Mapping[str, Any]) -> List[str]:
    """
    The presets whose architecture agrees with flags guessed from a checkpoint's shapes
    (:func:`improved_diffusion.checkpoints.guess_flags_from_state_dict`), for error messages.
    """
    names = []
    for preset in _PRESETS:
        if preset.kind == "classifier":
            continue
        flags = preset_flags(preset.name)
        size = flags.get("large_size", flags.get("image_size"))
        table = SR_CHANNEL_MULTS if preset.kind == "super_res" else None
        mult = ",".join(str(m) for m in channel_mult_for(size, flags["channel_mult"], table=table))
        shape_flags = dict(
            num_channels=flags["num_channels"],
            num_res_blocks=flags["num_res_blocks"],
            learn_sigma=flags["learn_sigma"],
            class_cond=flags["class_cond"],
            use_scale_shift_norm=flags["use_scale_shift_norm"],
            resblock_updown=flags["resblock_updown"],
            channel_mult=mult,
            attention_downsample_factors=tuple(
                sorted(attention_downsample_factors(flags["attention_resolutions"], size))
            ),
        )
        if all(guess.get(k) == v for k, v in shape_flags.items()):
            names.append(preset.name)
    return names
