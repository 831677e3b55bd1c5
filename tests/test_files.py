"""Saved results get the mode a plain open() gives (safetensors and mkstemp write 0600), and writes stay atomic."""
import os
import stat

import pytest
import torch

import sftint_fast as sf
from sftint_fast._files import atomic_write
from sftint_fast.distributed import save_shard
from sftint_fast.sft.probes import Probe, save_probes
from sftint_fast.sft.tracker import _atomic_save_tensors, _atomic_write_text


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_results_get_the_umask_mode_not_0600(tmp_path, umask):
    expected = 0o666 & ~umask
    save_shard(tmp_path / "shard.safetensors", torch.zeros(4), {"k": "v"})
    _atomic_save_tensors(tmp_path / "step.safetensors", {"values": torch.zeros(2)})
    _atomic_write_text(tmp_path / "step.json", "{}")
    save_probes([Probe(prompt="a b c?", answer="d")], tmp_path / "probes.jsonl")
    sf.and_or(torch.randn(8, dtype=torch.float64), method="sgd", niter=2, progress=False).save(tmp_path / "res")
    from sftint_fast.plot import _save
    import matplotlib.pyplot as plt

    _save(plt.figure(), tmp_path / "fig.png")
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["fig.png", "probes.jsonl", "res.json", "res.safetensors", "shard.safetensors", "step.json",
                       "step.safetensors"]  # and no temp file left
    assert {name: _mode(tmp_path / name) for name in written} == dict.fromkeys(written, expected)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_the_file_and_its_rename_reach_the_disk_before_the_writer_returns(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    target = tmp_path / "a.safetensors"
    save_shard(target, torch.zeros(3), {})
    assert len(synced) == 2 and synced[1] == str(tmp_path)  # the temp file's data, then the folder's rename
    assert synced[0].startswith(str(tmp_path / ".a.")) and target.is_file()


def _disk_full_after(monkeypatch, written: int = 0) -> None:
    """safetensors' writer fails as on a full disk: ``written`` bytes reach the file, then the error it raises there
    (a ``SafetensorError``, no ``OSError``)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def serialize_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * written)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)


@pytest.mark.parametrize("written", [0, 5])
def test_a_full_disk_while_saving_tensors_is_an_oserror_that_names_the_file(tmp_path, monkeypatch, written):
    """safetensors reports a full disk as its own SafetensorError, which callers catching OSError (the CLI's one-line
    refusal) let through as a traceback that named no file."""
    import errno

    from sftint_fast.distributed import load_shard

    target = tmp_path / "shard.safetensors"
    save_shard(target, torch.ones(4), {})
    _disk_full_after(monkeypatch, written)
    with pytest.raises(OSError, match="No space left on device") as info:
        save_shard(target, torch.zeros(4), {})
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)
    with pytest.raises(OSError, match=r"step\.safetensors"):
        _atomic_save_tensors(tmp_path / "step.safetensors", {"values": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(load_shard(target), torch.ones(4))  # the earlier file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["shard.safetensors"]  # no temp file left


def test_other_write_errors_keep_their_type(tmp_path):
    """Only I/O errors become OSErrors naming the file: a tensor safetensors refuses stays its own error."""
    from safetensors import SafetensorError

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a.json", lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises((ValueError, SafetensorError)) as info:
        _atomic_save_tensors(tmp_path / "b.safetensors", {"x": torch.zeros(4, 4).t()})  # not contiguous
    assert not isinstance(info.value, OSError)
    assert list(tmp_path.iterdir()) == []
