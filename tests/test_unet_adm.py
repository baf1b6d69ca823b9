"""The [ADM] architecture options and the noised classifier against guided-diffusion's golden outputs."""

import pytest
import torch
from golden import load_pt

from improved_diffusion import script_util
from improved_diffusion.errors import UserError
from improved_diffusion.nn import SpeedSettings
from improved_diffusion.unet import EncoderUNetModel, ResBlock, attention

OUTPUT_ATOL = 1e-5  # guided README: model outputs
LOGITS = dict(atol=1e-4, rtol=1e-5)  # guided README: classifier logits
FACTORIES = {"unet_adm32.pt": script_util.create_model, "unet_superres_adm.pt": script_util.sr_create_model}

pytestmark = pytest.mark.usefixtures("one_thread")


def _golden_unet(name: str):
    data = load_pt(f"guided/{name}")
    model = FACTORIES.get(name, script_util.create_model)(**data["kwargs"])
    model.load_state_dict(data["state_dict"], strict=True)
    model.eval()
    return data, model


@pytest.mark.parametrize(
    "name,sdpa,winograd",
    # New attention order (adm32) and legacy order (legacy64, superres) through SDPA and the
    # plain formula; the last three compute exactly as the reference (no Winograd convolutions).
    [
        (name, sdpa, winograd)
        for name in ("unet_adm32.pt", "unet_legacy64.pt", "unet_superres_adm.pt")
        for sdpa, winograd in ((True, True), (False, True), (False, False))
    ],
)
def test_golden_adm_outputs(name, sdpa, winograd):
    data, model = _golden_unet(name)
    extras = {k: data[k] for k in ("y", "low_res") if k in data}
    model.set_speed(SpeedSettings(sdpa=sdpa, winograd=winograd))
    with torch.no_grad():
        torch.testing.assert_close(
            model(data["x"], data["timesteps"], **extras), data["output"], rtol=0, atol=OUTPUT_ATOL
        )
        if "timesteps_float" in data:
            out = model(data["x"], data["timesteps_float"], **extras)
            torch.testing.assert_close(out, data["output_float_t"], rtol=0, atol=OUTPUT_ATOL)


@pytest.mark.parametrize("name", ["unet_adm32.pt", "unet_legacy64.pt", "unet_superres_adm.pt"])
def test_golden_adm_keys_shapes_and_counts(name):
    data, model = _golden_unet(name)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in data["state_dict"].items()
    ]
    assert sum(p.numel() for p in model.parameters()) == data["n_params"]


def test_head_count_from_head_channels():
    data, model = _golden_unet("unet_adm32.pt")
    heads = [b.num_heads for b in model.modules() if hasattr(b, "qkv")]
    widths = [b.channels for b in model.modules() if hasattr(b, "qkv")]
    assert heads == [w // 16 for w in widths] and set(heads) == {4}


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_new_attention_order_matches_written_out_formula(heads):
    qkv = torch.randn(2, 3 * 32, 20) * 2
    q, k, v = (part.reshape(2, heads, 32 // heads, 20).double() for part in qkv.chunk(3, dim=1))
    weights = torch.softmax(torch.einsum("nhct,nhcs->nhts", q, k) / (32 // heads) ** 0.5, dim=-1)
    expected = torch.einsum("nhts,nhcs->nhct", weights, v).reshape(2, 32, 20).float()
    for sdpa in (True, False):
        out = attention(qkv, heads, new_order=True, use_sdpa=sdpa)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if heads > 1:  # one head: both layouts are the same
        assert not torch.allclose(attention(qkv, heads), expected, atol=1e-3)


def test_updown_resblock_resamples_and_has_a_plain_blocks_keys():
    plain, down, up = (ResBlock(32, 64, 0.0, **kw) for kw in ({}, {"down": True}, {"up": True}))
    assert list(down.state_dict()) == list(plain.state_dict()) == list(up.state_dict())
    x, emb = torch.randn(1, 32, 8, 8), torch.randn(1, 64)
    assert down(x, emb).shape == (1, 32, 4, 4) and up(x, emb).shape == (1, 32, 16, 16)


def _small_model_flags(**overrides) -> dict:
    flags = {k: v for k, v in script_util.model_and_diffusion_defaults().items() if k in FLAGS_OF_CREATE_MODEL}
    flags.update(image_size=16, num_channels=64, num_res_blocks=1, attention_resolutions="8")
    flags.update(overrides)
    return flags


FLAGS_OF_CREATE_MODEL = script_util.create_model.__code__.co_varnames


def test_fractional_channel_mult_gives_int_of_mult_times_channels():
    assert script_util.channel_mult_for(512) == (0.5, 1, 1, 2, 2, 4, 4)
    assert script_util.SR_CHANNEL_MULTS[512] == (1, 1, 2, 2, 4, 4)
    assert script_util.channel_mult_for(16, "0.5,1,2") == (0.5, 1, 2)
    model = script_util.create_model(**_small_model_flags(channel_mult="0.5,1,1.5", num_heads=1))
    assert model.input_blocks[0][0].weight.shape[0] == 32  # int(0.5 * 64), as the output head
    assert model.out[0].num_channels == 32
    assert [b[0].out_channels for b in model.input_blocks[1:] if isinstance(b[0], ResBlock)] == [32, 64, 96]
    assert model(torch.randn(1, 3, 16, 16), torch.tensor([3])).shape == (1, 3, 16, 16)
    with pytest.raises(UserError, match=r"--channel_mult '1,-2'.*positive"):
        script_util.channel_mult_for(16, "1,-2")


def test_head_channels_not_dividing_the_width_names_the_flag():
    with pytest.raises(UserError, match=r"--num_head_channels: 64 channels cannot be split into heads of 48 channels"):
        script_util.create_model(**_small_model_flags(channel_mult="1,1", num_head_channels=48))
    with pytest.raises(UserError, match=r"--num_head_channels 0: expected -1"):
        script_util.create_model(**_small_model_flags(channel_mult="1,1", num_head_channels=0))


# -- noised classifier -------------------------------------------------------------------------

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


def _golden_classifier(pool: str):
    data = load_pt("guided/classifiers.pt")
    entry = data["models"][pool]
    model = EncoderUNetModel(**entry["kwargs"])
    model.load_state_dict(entry["state_dict"], strict=True)
    model.eval()
    return data, entry, model


@pytest.mark.parametrize("pool,sdpa", [(pool, sdpa) for pool in POOLS for sdpa in (True, False)])
def test_golden_classifier_logits(pool, sdpa):
    data, entry, model = _golden_classifier(pool)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in entry["state_dict"].items()
    ]
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]
    model.set_speed(SpeedSettings(sdpa=sdpa))
    with torch.no_grad():
        torch.testing.assert_close(model(data["x"], data["timesteps"]), entry["output"], **LOGITS)


def test_create_classifier_and_diffusion_from_defaults():
    flags = dict(script_util.classifier_and_diffusion_defaults(), image_size=32, classifier_width=32)
    flags.update(classifier_depth=1, classifier_attention_resolutions="8")
    flags = {k: v for k, v in flags.items() if k in script_util.create_classifier_and_diffusion.__code__.co_varnames}
    classifier, diffusion = script_util.create_classifier_and_diffusion(**flags)
    assert classifier.pool == "attention" and classifier.out_channels == 1000 and diffusion.num_timesteps == 1000
    assert classifier(torch.randn(2, 3, 32, 32), torch.tensor([1, 999])).shape == (2, 1000)


def test_classifier_bad_pool_and_attention_pool_without_head_width():
    kwargs = dict(load_pt("guided/classifiers.pt")["models"]["attention"]["kwargs"])
    with pytest.raises(UserError, match=r"--classifier_pool 'max': expected one of 'adaptive', 'attention'"):
        EncoderUNetModel(**dict(kwargs, pool="max"))
    with pytest.raises(UserError, match=r"--classifier_pool 'attention' needs .*num_head_channels"):
        EncoderUNetModel(**dict(kwargs, num_head_channels=-1))
    flags = {k: v for k, v in script_util.classifier_defaults().items()}
    with pytest.raises(UserError, match=r"^--classifier_pool 'max': expected one of"):
        script_util.create_classifier(**dict(flags, classifier_pool="max"))


def test_use_fp16_converts_the_torso_and_diffusion_defaults_are_a_subset():
    model = script_util.create_model(**_small_model_flags(channel_mult="1,1", use_fp16=True))
    assert model.dtype == torch.float16 and model.time_embed[0].weight.dtype == torch.float32
    defaults = script_util.model_and_diffusion_defaults()
    assert script_util.diffusion_defaults() == {k: defaults[k] for k in script_util.diffusion_defaults()}
    assert {"diffusion_steps", "rescale_timesteps", "learn_sigma"} <= set(script_util.diffusion_defaults())
    assert set(script_util.classifier_and_diffusion_defaults()) == set(script_util.classifier_defaults()) | set(
        script_util.diffusion_defaults()
    )
