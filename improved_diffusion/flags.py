"""
The one table of command-line flags: every flag of every script with its default, one line of
help and, for closed choices, the allowed values, in the groups MODEL, DIFFUSION, CLASSIFIER,
TRAIN, CLASSIFIER_TRAIN, SAMPLE, CLASSIFIER_SAMPLE, NLL, EVALUATE and SPEED.

Everything about flags is derived from it: the defaults dicts users know from the original
(``model_and_diffusion_defaults()``, ``sr_model_and_diffusion_defaults()`` in
:mod:`.script_util`, ``training_defaults()``, ``sampling_defaults()``), the scripts' argparse
groups with their ``--help`` (:func:`.script_util.script_parser`) and the README's flag section
(:func:`reference_markdown`; ``python -m improved_diffusion.flags`` prints it, a test checks
that the README holds exactly that text).

A flag that only some scripts have names them in ``scripts`` (e.g. ``image_size`` belongs to
the image scripts, ``large_size`` to the super-resolution ones).
"""

import dataclasses
import sys
from typing import Any, Dict, Iterable, List, Tuple

from .errors import UserError
from .fileio import atomic_write
from .nn import SpeedSettings

IMAGE_SCRIPTS = ("image_train", "image_sample", "image_nll")
SUPER_RES_SCRIPTS = ("super_res_train", "super_res_sample")
CLASSIFIER_SCRIPTS = ("classifier_train", "classifier_sample")
NETWORK_SCRIPTS = IMAGE_SCRIPTS + SUPER_RES_SCRIPTS + CLASSIFIER_SCRIPTS  # the scripts that build a network
SCRIPTS = NETWORK_SCRIPTS + ("image_evaluate",)
# The feature networks of scripts/image_evaluate.py (--features).
FEATURES = ("inception", "digits")
DIFFUSION_TRAIN_SCRIPTS = ("image_train", "super_res_train")
# The names of :data:`.samplers.SAMPLERS` (a test keeps them equal; this module sits below samplers).
SAMPLERS = ("ancestral", "ddim", "dpm++2m", "dpm++2m-sde", "heun")


@dataclasses.dataclass(frozen=True)
class Flag:
    """
    One flag: ``--name`` with its default, one line of help and the allowed values of a closed
    choice (empty: any value of the default's type); ``scripts`` lists where it exists (empty:
    every script that has its group); ``new`` marks flags the original did not have; ``auto``
    marks a boolean that also takes ``auto``.
    """

    name: str
    default: Any
    help: str
    choices: Tuple[Any, ...] = ()
    scripts: Tuple[str, ...] = ()
    new: bool = False
    auto: bool = False

    def applies_to(self, script: str) -> bool:
        """Whether ``script`` (e.g. ``"image_train"``) has this flag."""
        return not self.scripts or script in self.scripts

    def help_line(self) -> str:
        """The ``--help`` text: meaning, allowed values, default."""
        text = self.help
        if self.auto:
            text += " (True, False or auto)"
        if self.choices:
            text += " (one of: " + ", ".join(str(c) for c in self.choices) + ")"
        return text + f" [default: {_shown(self.default)}]"


@dataclasses.dataclass(frozen=True)
class FlagGroup:
    """A titled group of flags and the scripts that have it."""

    title: str
    description: str
    scripts: Tuple[str, ...]
    flags: Tuple[Flag, ...]

    def for_script(self, script: str) -> List[Flag]:
        """The flags of this group that ``script`` has."""
        return [f for f in self.flags if f.applies_to(script)] if script in self.scripts else []


def _shown(value: Any) -> str:
    return '""' if value == "" else str(value)


MODEL = FlagGroup(
    "MODEL",
    "the network; defaults as in the original",
    IMAGE_SCRIPTS + SUPER_RES_SCRIPTS + ("classifier_sample",),
    (
        Flag(
            "image_size",
            64,
            "side of the (square) training images in pixels",
            scripts=IMAGE_SCRIPTS + ("classifier_sample",),
        ),
        Flag("large_size", 256, "side of the high-resolution images", scripts=SUPER_RES_SCRIPTS),
        Flag(
            "small_size", 64, "side of the low-resolution images the model is conditioned on", scripts=SUPER_RES_SCRIPTS
        ),
        Flag("num_channels", 128, "base channel count of the UNet (a multiple of 32)"),
        Flag("num_res_blocks", 2, "residual blocks per resolution level"),
        Flag("num_heads", 4, "attention heads in the downsampling half and the middle"),
        Flag("num_heads_upsample", -1, "attention heads in the upsampling half; -1: --num_heads"),
        Flag("attention_resolutions", "16,8", "feature-map sides that get self-attention, comma-separated"),
        Flag("dropout", 0.0, "dropout probability in the residual blocks, in [0, 1)"),
        Flag("class_cond", False, "class-conditional (labels from file names {class}_{name}.png)"),
        Flag("use_checkpoint", False, "gradient checkpointing: less memory, activations recomputed in backward"),
        Flag("use_scale_shift_norm", True, "FiLM time conditioning norm(h) * (1 + scale) + shift"),
        Flag("channel_mult", "", 'channel multiplier per level, e.g. 1,2,2 or 0.5,1,2; "": the table for the size'),
        Flag("num_head_channels", -1, "channels per attention head [ADM]; -1: heads by --num_heads"),
        Flag("resblock_updown", False, "down/upsample inside residual blocks [ADM]"),
        Flag("use_new_attention_order", False, "split q, k, v before the heads [ADM]"),
        Flag(
            "num_classes",
            1000,
            "classes of a class-conditional model (rows of its label table); data with more is an error",
            new=True,
        ),
        Flag(
            "class_dropout_prob",
            0.0,
            "label dropout for classifier-free guidance [CFG Alg. 1]: each training label becomes the null "
            "label with this probability; > 0 adds the null label's row to the label table",
            new=True,
        ),
        Flag("image_channels", 3, "channels of the images: 1 grey, 3 RGB (2 grey + alpha, 4 RGBA)", new=True),
    ),
)

DIFFUSION = FlagGroup(
    "DIFFUSION",
    "the diffusion process and its loss; defaults as in the original",
    NETWORK_SCRIPTS,
    (
        Flag("learn_sigma", False, "learn the variance by range interpolation [IDDPM Eq. 15]: 6 output channels"),
        Flag(
            "sigma_small",
            False,
            "with a fixed variance: the posterior beta-tilde instead of beta",
            scripts=IMAGE_SCRIPTS + CLASSIFIER_SCRIPTS,
        ),
        Flag("diffusion_steps", 1000, "number of diffusion steps T"),
        Flag("noise_schedule", "linear", "beta schedule [IDDPM §3.2]", choices=("linear", "cosine")),
        Flag("timestep_respacing", "", 'steps kept for sampling: "250", "10,15,20" per section or "ddim50"; "": all'),
        Flag("use_kl", False, "train on the variational bound L_vlb alone"),
        Flag("predict_xstart", False, "the network predicts x_0 instead of the noise"),
        Flag("rescale_timesteps", True, "feed the network t scaled to [0, 1000)"),
        Flag(
            "rescale_learned_sigmas", True, "with --learn_sigma: the hybrid loss L_simple + 0.001 L_vlb [IDDPM Eq. 16]"
        ),
    ),
)

TRAIN = FlagGroup(
    "TRAIN",
    "the training loop",
    DIFFUSION_TRAIN_SCRIPTS + ("classifier_train",),
    (
        Flag("data_dir", "", "folder of training images (jpg, jpeg, png, gif; searched recursively)"),
        Flag(
            "schedule_sampler",
            "uniform",
            "how timesteps are drawn [IDDPM §3.3]",
            choices=("uniform", "loss-second-moment"),
        ),
        Flag("lr", 1e-4, "AdamW learning rate", scripts=DIFFUSION_TRAIN_SCRIPTS),
        Flag(
            "snr_gamma",
            0.0,
            "min-SNR-gamma weighting of the simple loss [Hang et al. 2023], e.g. 5; 0: off",
            scripts=DIFFUSION_TRAIN_SCRIPTS,
            new=True,
        ),
        Flag("weight_decay", 0.0, "AdamW weight decay"),
        Flag(
            "lr_anneal_steps",
            0,
            "anneal the learning rate linearly to 0 over this many steps, then stop; 0: never",
            scripts=DIFFUSION_TRAIN_SCRIPTS,
        ),
        Flag("batch_size", 1, "images per step and process", scripts=DIFFUSION_TRAIN_SCRIPTS),
        Flag("microbatch", -1, "split each batch into chunks of this size (same gradient); -1: no split"),
        Flag(
            "ema_rate",
            "0.9999",
            "comma-separated EMA rates, one ema_RATE_STEP.pt file each",
            scripts=DIFFUSION_TRAIN_SCRIPTS,
        ),
        Flag("log_interval", 10, "steps between log rows"),
        Flag("save_interval", 10000, "steps between checkpoints (0: only at the end)"),
        Flag(
            "resume_checkpoint", "", 'a modelNNNNNN.pt to resume from, or "auto": the newest complete one in --log_dir'
        ),
        Flag("use_fp16", False, "float16 autocast with loss scaling (on CUDA; bfloat16 on a CPU)"),
        Flag("fp16_scale_growth", 1e-3, "log2 growth of the fp16 loss scale per good step"),
        Flag("log_dir", "", "log and checkpoint folder; default $OPENAI_LOGDIR, else ./logs/<time>", new=True),
        Flag("use_bf16", False, "bfloat16 autocast (no loss scaling); auto: if native", new=True, auto=True),
        Flag("max_steps", 0, "stop after this many steps in total; 0: no limit", new=True),
        Flag("random_flip", False, "flip images left-right at random", scripts=DIFFUSION_TRAIN_SCRIPTS, new=True),
        Flag(
            "random_crop",
            False,
            "random crops: shorter side resized to 1 to 1.25 x image_size, then a random square",
            scripts=DIFFUSION_TRAIN_SCRIPTS,
            new=True,
        ),
        Flag("seed", 0, "seed of weights, timesteps, noise and data order", new=True),
        Flag("num_workers", 0, "image-decoding worker processes", new=True),
        Flag("channels_last", False, "feed the network channels-last tensors (faster on GPUs)", new=True),
        Flag("compile", False, "run the network through torch.compile", new=True),
        Flag(
            "deterministic",
            False,
            "runs and resumes repeat bit for bit: deterministic GPU kernels, Winograd by its size rule, not timing",
            new=True,
        ),
    ),
)

SAMPLE = FlagGroup(
    "SAMPLE",
    "sampling",
    ("image_sample", "super_res_sample", "classifier_sample"),
    (
        Flag("model_path", "", "the checkpoint (.pt) to load; flags from the args.json beside it are the defaults"),
        Flag("clip_denoised", True, "clip the predicted x_0 to [-1, 1] at every step"),
        Flag("num_samples", 10000, "number of samples"),
        Flag("batch_size", 16, "samples per batch and process"),
        Flag("use_ddim", False, "DDIM instead of ancestral sampling [DDIM Eq. 12]: the same as --sampler ddim"),
        Flag(
            "sampler",
            "ancestral",
            "the update at each respaced step (--timestep_respacing decides where the model runs): "
            "ancestral [DDPM Alg. 2], ddim [DDIM Eq. 12], dpm++2m [DPM-Solver++ Alg. 2] (ODE), dpm++2m-sde (its "
            "SDE variant: fresh noise at every step, like ancestral) or heun [EDM Alg. 1]; "
            "one network evaluation per step, but heun costs two per step except the last (2 x steps - 1)",
            choices=SAMPLERS,
            new=True,
        ),
        Flag(
            "guidance_scale",
            1.0,
            "classifier-free guidance w [CFG Eq. 6]: eps_uncond + w (eps_cond - eps_uncond); 1: the "
            "conditional model, 0: the unconditional one; needs a model trained with --class_dropout_prob > 0",
            new=True,
        ),
        Flag("log_dir", "", "output folder; default $OPENAI_LOGDIR, else ./logs/<time>", new=True),
        Flag("seed", 0, "seed of each sample's noise and label", new=True),
        Flag("eta", 0.0, "DDIM noise (0: deterministic); --sampler ddim only", new=True),
        Flag("num_grid", 64, "samples in the PNG grid (0: none); --grid_size is another name", new=True),
        Flag("use_bf16", False, "bfloat16 autocast; auto: where the CPU/GPU runs it natively", new=True, auto=True),
        Flag(
            "class_labels",
            "",
            'labels to sample, e.g. 0,1,2 (cycled); "": random labels',
            scripts=("image_sample", "classifier_sample"),
            new=True,
        ),
        Flag(
            "base_samples",
            "",
            "the .npz of low-resolution samples to upsample",
            scripts=("super_res_sample",),
            new=True,
        ),
    ),
)

CLASSIFIER = FlagGroup(
    "CLASSIFIER",
    "the noised image classifier [ADM §4]; guided-diffusion's names and defaults",
    CLASSIFIER_SCRIPTS,
    (
        Flag("image_size", 64, "side of the images it classifies", scripts=("classifier_train",)),
        Flag("classifier_use_fp16", False, "convert its torso to float16 (prefer autocast)"),
        Flag("classifier_width", 128, "base channel count"),
        Flag("classifier_depth", 2, "residual blocks per resolution level"),
        Flag("classifier_attention_resolutions", "32,16,8", "feature-map sides that get self-attention"),
        Flag("classifier_use_scale_shift_norm", True, "FiLM time conditioning"),
        Flag("classifier_resblock_updown", True, "down/upsample inside residual blocks"),
        Flag("classifier_pool", "attention", "the head", choices=("adaptive", "attention", "spatial", "spatial_v2")),
        Flag(
            "classifier_num_classes",
            1000,
            "logits: the classes it tells apart (at least the class names of its training data; guided: 1000)",
            new=True,
        ),
        Flag(
            "classifier_image_channels",
            3,
            "channels of the images it classifies: 1 grey ... 3 RGB, 4 RGBA (the guided model's --image_channels)",
            new=True,
        ),
    ),
)

CLASSIFIER_TRAIN = FlagGroup(
    "CLASSIFIER_TRAIN",
    "training the noised classifier; guided-diffusion's names and defaults, the rest as in TRAIN",
    ("classifier_train",),
    (
        Flag("val_data_dir", "", 'folder of labelled validation images ("": no validation)'),
        Flag("noised", True, "classify noised images x_t at sampled t (False: clean images, t = 0)"),
        Flag("iterations", 150000, "training steps in total"),
        Flag("lr", 3e-4, "AdamW learning rate"),
        Flag("anneal_lr", False, "anneal the learning rate linearly to 0 over --iterations"),
        Flag("batch_size", 4, "images per step and process"),
        Flag("eval_interval", 5, "steps between validation batches"),
        Flag("ema_rate", "", 'comma-separated EMA rates, one ema_RATE_STEP.pt file each ("": none)', new=True),
        Flag(
            "random_crop",
            True,
            "random crops: shorter side resized to 1 to 1.25 x image_size, then a random square",
            new=True,
        ),
        Flag("random_flip", True, "flip images left-right at random", new=True),
    ),
)

CLASSIFIER_SAMPLE = FlagGroup(
    "CLASSIFIER_SAMPLE",
    "classifier guidance [ADM Alg. 1 and 2]; guided-diffusion's names and defaults",
    ("classifier_sample",),
    (
        Flag("classifier_path", "", "the noised classifier (.pt); flags from the args.json beside it are the defaults"),
        Flag("classifier_scale", 1.0, "guidance scale s: the classifier's log-probability gradient times s (0: none)"),
    ),
)

NLL = FlagGroup(
    "NLL",
    "likelihood evaluation",
    ("image_nll",),
    (
        Flag("data_dir", "", "folder of images to evaluate"),
        Flag("model_path", "", "the checkpoint (.pt) to load; flags from the args.json beside it are the defaults"),
        Flag("clip_denoised", True, "clip the predicted x_0 to [-1, 1]"),
        Flag("num_samples", 1000, "number of images evaluated"),
        Flag("batch_size", 1, "images per batch and process"),
        Flag("log_dir", "", "output folder; default $OPENAI_LOGDIR, else ./logs/<time>", new=True),
        Flag("seed", 0, "seed of the q_sample noise", new=True),
        Flag("timestep_batch", 1, "timesteps evaluated per network call (same numbers, faster on GPUs)", new=True),
        Flag("use_bf16", False, "bfloat16 autocast; auto: where the CPU/GPU runs it natively", new=True, auto=True),
    ),
)

EVALUATE = FlagGroup(
    "EVALUATE",
    "scoring samples against reference images (positional: REF SAMPLES, each .npz, folder or stats file)",
    ("image_evaluate",),
    (
        Flag(
            "features",
            "inception",
            "the feature network: the FID Inception-v3, or the digit classifier",
            choices=FEATURES,
            new=True,
        ),
        Flag(
            "inception_weights", "", "weights-inception-2015-12-05-6726825d.pth (or $FID_INCEPTION_WEIGHTS)", new=True
        ),
        Flag("digit_classifier", "", 'digit classifier cache file ("": ~/.cache/improved-diffusion/...)', new=True),
        Flag("save_ref_stats", "", "write the reference's statistics to this .npz", new=True),
        Flag("out", "", 'the JSON file ("": beside SAMPLES, <stem>_eval_<features>.json)', new=True),
        Flag("batch_size", 64, "images per feature-network batch", new=True),
        Flag("device", "", 'cpu, cuda, cuda:1 ... ("": cuda when there is one)', new=True),
        Flag("nearest_k", 3, "k of precision/recall's k-NN manifolds", new=True),
        Flag("kid_subsets", 100, "KID: number of random subsets", new=True),
        Flag("kid_subset_size", 1000, "KID: points per subset", new=True),
        Flag("seed", 0, "seed of KID's subsets", new=True),
        Flag("progress", True, "progress bar over feature extraction", new=True),
    ),
)

_SPEED_HELP = {
    "sdpa": "attention through F.scaled_dot_product_attention, its 1x1 projections by F.linear (False: the original's)",
    "winograd": (
        "float32 3x3 convolutions on CPUs by Winograd F(4x4, 3x3): auto = timed per layer shape on first use, "
        "True = by a fixed size rule, False = direct convolution"
    ),
    "winograd_cache": 'with --winograd auto: a JSON file keeping the timings for later runs ("": none)',
    "native_kernels": (
        "CPU kernels compiled from C with the system compiler on first use: Winograd's tile transforms, "
        "channels-last GroupNorm (torch ops where no compiler works); False = torch ops"
    ),
}
SPEED = FlagGroup(
    "SPEED",
    "the network's speed settings: same results within float32 tolerance; sdpa, winograd and native_kernels False "
    "= the original's",
    NETWORK_SCRIPTS,
    tuple(
        Flag(k, v, _SPEED_HELP[k], new=True, auto=k == "winograd")
        for k, v in dataclasses.asdict(SpeedSettings()).items()
    ),
)

GROUPS = (MODEL, DIFFUSION, CLASSIFIER, TRAIN, CLASSIFIER_TRAIN, SAMPLE, CLASSIFIER_SAMPLE, NLL, EVALUATE, SPEED)


def flags_for(script: str, groups: Iterable[FlagGroup] = GROUPS) -> List[Tuple[FlagGroup, List[Flag]]]:
    """The groups ``script`` has, each with the flags of it that ``script`` has."""
    if script not in SCRIPTS:
        raise KeyError(f"unknown script {script!r} (known: {', '.join(SCRIPTS)})")
    return [(g, g.for_script(script)) for g in groups if g.for_script(script)]


def defaults_for(script: str, groups: Iterable[FlagGroup]) -> Dict[str, Any]:
    """``{name: default}`` of ``groups``' flags that ``script`` has."""
    return {f.name: f.default for _, flags in flags_for(script, groups) for f in flags}


def training_defaults() -> Dict[str, Any]:
    """Defaults of the TRAIN group plus the SPEED settings (shared by both training scripts)."""
    return defaults_for("image_train", (TRAIN, SPEED))


def sampling_defaults() -> Dict[str, Any]:
    """Defaults of the SAMPLE group that both sampling scripts share, plus the SPEED settings."""
    shared = [f.name for f in SAMPLE.flags if not f.scripts]
    full = defaults_for("image_sample", (SAMPLE, SPEED))
    return {k: v for k, v in full.items() if k in shared or k in speed_defaults()}


def speed_defaults() -> Dict[str, Any]:
    """Defaults of the SPEED group: ``{"sdpa": True, "winograd": True}``."""
    return {f.name: f.default for f in SPEED.flags}


def reference_markdown() -> str:
    """The README's flag section: one table per group (flag, default, meaning)."""
    lines: List[str] = []
    for group in GROUPS:
        scripts = ", ".join(f"`{s}.py`" for s in group.scripts)
        lines += ["", f"**{group.title}** ({group.description}; {scripts})", "", "| flag | default | meaning |"]
        lines.append("|---|---|---|")
        for flag in group.flags:
            meaning = flag.help.replace("|", "\\|")
            if flag.auto:
                meaning += " (`True`, `False` or `auto`)"
            if flag.choices:
                meaning += " (one of: " + ", ".join(f"`{c}`" for c in flag.choices) + ")"
            if flag.scripts:
                meaning += " — only " + ", ".join(f"`{s}.py`" for s in flag.scripts)
            if flag.new:
                meaning += " *(new)*"
            lines.append(f"| `--{flag.name}` | `{_shown(flag.default)}` | {meaning} |")
    return "\n".join(lines[1:]) + "\n"


README_BEGIN, README_END = "<!-- flags:begin -->\n", "<!-- flags:end -->"


def update_readme(path: str) -> None:
    """Replace the text between the flag-section markers of ``path`` with :func:`reference_markdown`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise UserError(f"{path} has no {README_BEGIN.strip()} ... {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    new = head + README_BEGIN + reference_markdown() + README_END + tail
    atomic_write(path, lambda f: f.write(new.encode("utf-8")))


if __name__ == "__main__":
    # python -m improved_diffusion.flags            print the README's flag section
    # python -m improved_diffusion.flags README.md  rewrite it in place
    if len(sys.argv) > 1:
        update_readme(sys.argv[1])
    else:
        sys.stdout.write(reference_markdown())
