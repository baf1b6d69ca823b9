"""
The FID Inception-v3 network against golden taps computed with a reference port
(tests/fixtures/inception_fid_small.pt, see tests/fixtures/README.md): the weights are rebuilt
here from the golden README's seeded recipe, loaded strictly, and every tap of the four inputs
(32x32, 64x64, 299x299, non-square 48x40) must match; the TF1 resize is checked on its own.
Also: the weights file is found from the flag or the environment, and wrong files give one line.
"""

import pytest
import torch
from golden import load_pt
from seeded_inception import seeded_state_dict

from improved_diffusion.errors import UserError
from improved_diffusion.inception import (
    WEIGHTS_ENV,
    WEIGHTS_FILE,
    InceptionV3FID,
    inception_weights_path,
    load_inception,
    tf1_resize_bilinear,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = "inception_fid_small.pt"
TAP_TOL = dict(atol=1e-4, rtol=1e-5)  # golden README: every tap; thread count alone moves them by 1e-5
RESIZE_TOL = dict(atol=1e-3, rtol=0.0)
CASES = ("x32", "x64", "x299", "smooth48x40")
TAPS = {  # golden key suffix -> our tap name
    "64": "64",
    "192": "192",
    "768": "768",
    "2048": "2048",
    "logits_unbiased": "logits_unbiased",
    "logits": "logits",
    "spatial_mixed6d_1x1_first7": "spatial",
}


@pytest.fixture(scope="module")
def golden():
    return load_pt(FIXTURE)


@pytest.fixture(scope="module")
def weights_file(golden, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(seeded_state_dict(golden["key_shapes"], golden["seed"]), path)
    return str(path)


@pytest.fixture(scope="module")
def network(weights_file):
    return load_inception(weights_file)


def test_architecture_has_the_distributed_keys_and_parameter_count(golden):
    state = InceptionV3FID().state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == [[k, list(s)] for k, s in golden["key_shapes"]]
    # The README's count: every float entry (parameters and batch-norm running statistics).
    assert sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")) == 23_885_392


@pytest.mark.parametrize("case", CASES)
def test_golden_taps(network, golden, case):
    with torch.no_grad():
        taps = network(golden[f"{case}.input"])
    for key, tap in TAPS.items():
        torch.testing.assert_close(taps[tap], golden[f"{case}.{key}"], **TAP_TOL, msg=lambda m: f"{case}.{key}: {m}")
    features = network.evaluation_features(golden[f"{case}.input"])
    assert features["spatial"].shape == (len(golden[f"{case}.input"]), 2023)


@pytest.mark.parametrize("case", ["x32", "smooth48x40"])
def test_tf1_resize_matches_golden(golden, case):
    index = golden["resized299_index"]
    resized = tf1_resize_bilinear(golden[f"{case}.input"].float())
    assert resized.shape[-2:] == (299, 299)
    torch.testing.assert_close(
        resized[:, :, index][:, :, :, index], golden[f"{case}.resized299_rows_cols"], **RESIZE_TOL
    )


def test_tf1_resize_is_not_torch_bilinear():
    x = torch.arange(32.0).repeat(32, 1)[None, None]
    ours = tf1_resize_bilinear(x)
    # No half-pixel centres: output pixel i reads source i * 32 / 299, so the first column is the source's.
    torch.testing.assert_close(ours[0, 0, 0, :3], torch.tensor([0.0, 32 / 299, 64 / 299]), atol=1e-6, rtol=0)
    for align in (False, True):
        theirs = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=align)
        assert (ours - theirs).abs().max() > 0.1


def test_weights_path_from_flag_or_environment(weights_file, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert inception_weights_path(weights_file) == weights_file
    with pytest.raises(UserError, match=rf"no Inception weights given: .*{WEIGHTS_FILE}.*copy the file"):
        inception_weights_path("")
    monkeypatch.setenv(WEIGHTS_ENV, weights_file)
    assert inception_weights_path("") == weights_file
    with pytest.raises(UserError, match=rf"--inception_weights /nowhere/w.pth: no such file; .*{WEIGHTS_FILE}"):
        inception_weights_path("/nowhere/w.pth")


def test_wrong_weights_file_names_the_keys(golden, tmp_path):
    state = seeded_state_dict(golden["key_shapes"], 0)
    del state["fc.bias"]
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(1, 2, 3, 4)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as info:
        load_inception(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"{path} is not the FID Inception weights {WEIGHTS_FILE}: 1 missing keys (fc.bias); "
        "1 unexpected keys (extra.weight); "
        "1 wrong shapes (Mixed_5b.branch1x1.conv.weight (1, 2, 3, 4) != (64, 192, 1, 1))"
    )
    torch.save([1, 2], path)
    with pytest.raises(UserError, match="holds a list, not a state dict"):
        load_inception(str(path))
