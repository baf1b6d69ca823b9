"""Atomic writes and safe checkpoint loading."""

import os
import pickle

import numpy as np
import pytest
import torch

from improved_diffusion.errors import UserError
from improved_diffusion.fileio import (
    atomic_save_json,
    atomic_save_npz,
    atomic_torch_save,
    atomic_write,
    remove_stale_temporaries,
    safe_torch_load,
)


@pytest.fixture
def folder(tmp_path):
    """A folder of this test's own (the shared tmp_path also holds the logger's folder)."""
    folder = tmp_path / "io"
    folder.mkdir()
    return folder


def test_round_trips(folder):
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    atomic_torch_save(sd, str(folder / "m.pt"))
    torch.testing.assert_close(safe_torch_load(str(folder / "m.pt"))["w"], sd["w"], rtol=0, atol=0)
    atomic_save_npz(str(folder / "s.npz"), np.ones((2, 4, 4, 3), np.uint8), np.arange(2))
    with np.load(folder / "s.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_1"].tolist() == [0, 1]
    atomic_save_json({"b": 1, "a": 2}, str(folder / "a.json"))
    assert (folder / "a.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert sorted(os.listdir(folder)) == ["a.json", "m.pt", "s.npz"]  # no temporaries left


def test_failed_write_keeps_the_old_file_and_names_the_path(folder):
    path = str(folder / "model000001.pt")
    atomic_torch_save({"w": torch.zeros(2)}, path)

    def full_disk(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match=r"could not write .*model000001.pt: No space left on device"):
        atomic_write(path, full_disk)
    torch.testing.assert_close(safe_torch_load(path)["w"], torch.zeros(2), rtol=0, atol=0)
    assert os.listdir(folder) == ["model000001.pt"]


def test_interrupted_write_removes_its_temporary(folder):
    def interrupted(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(folder / "x.bin"), interrupted)
    assert os.listdir(folder) == []


def test_bad_checkpoints_give_one_line_errors(folder):
    missing = str(folder / "nope.pt")
    with pytest.raises(UserError, match=r"file not found: .*nope.pt"):
        safe_torch_load(missing)
    empty = folder / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"checkpoint .*empty.pt is empty \(0 bytes\)"):
        safe_torch_load(str(empty))
    good = folder / "good.pt"
    torch.save({"w": torch.randn(64, 64)}, good)
    truncated = folder / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"could not load checkpoint .*truncated.pt \(truncated or corrupt\?\)"):
        safe_torch_load(str(truncated))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch should-not-exist",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused_and_never_run(folder, monkeypatch):
    monkeypatch.chdir(folder)
    evil = folder / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"w": _Payload()}, f)
    with pytest.raises(UserError, match=r"refusing to load .*evil.pt: it holds pickled Python objects"):
        safe_torch_load(str(evil))
    assert not (folder / "should-not-exist").exists()


def test_remove_stale_temporaries_only_touches_checkpoint_temporaries(folder):
    for name in [".tmp-model000003.pt.a1", ".tmp-ema_0.9999_000003.pt.b2", ".tmp-opt000003.pt.c", ".tmp-samples.npz.d"]:
        (folder / name).write_bytes(b"x")
    (folder / "model000002.pt").write_bytes(b"keep")
    assert remove_stale_temporaries(str(folder)) == 3
    assert sorted(os.listdir(folder)) == [".tmp-samples.npz.d", "model000002.pt"]
