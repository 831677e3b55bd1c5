"""chat_template_kwargs (e.g. Qwen3's enable_thinking) through every chat=True entry point, and the warning for a
thinking template left at its default."""
import json
import warnings

import pytest
import torch

import sftint_fast.game
from conftest import tiny_model
from sftint_fast.cli import main
from sftint_fast.game import Game
from sftint_fast.sft.probes import Probe, heldout_batches, prompt_ids, scan_probes, sft_example
from sftint_fast.sft.tracker import SFTTracker
from word_tokenizer import word_tokenizer

# modelled on Qwen3's: thinking on by default (the model writes <think> itself); enable_thinking=false appends an
# empty thinking block to the generation prompt
THINKING_TEMPLATE = ("{% for m in messages %}<bos> {{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                     "{% if add_generation_prompt %}<bos> assistant : "
                     "{% if enable_thinking is defined and enable_thinking is false %}<think> </think> {% endif %}"
                     "{% endif %}")
# a template without a switch whose generation prompt opens a thinking block (DeepSeek-R1 distills)
OPEN_THINK_TEMPLATE = ("{% for m in messages %}<bos> {{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                       "{% if add_generation_prompt %}<bos> assistant : <think> {% endif %}")
TEXT = "the big cat sat on the mat"
OFF = {"enable_thinking": False}


def _tokenizer(template=THINKING_TEMPLATE):
    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tok.chat_template = template
    return tok


@pytest.fixture
def tok():
    return _tokenizer()


@pytest.fixture
def model():
    return tiny_model("llama")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(sftint_fast.game, "_WARNED_THINKING", set(), raising=False)


def _think_ids(tok):
    return tok.convert_tokens_to_ids(["<think>", "</think>"])


def test_the_kwargs_change_the_rendered_ids_and_keep_the_players(model, tok):
    on = Game.from_text(model, tok, TEXT, chat=True, chat_template_kwargs={"enable_thinking": True})
    off = Game.from_text(model, tok, TEXT, chat=True, chat_template_kwargs=OFF)
    think = _think_ids(tok)
    assert off.input_ids[off.prompt_length - 2:off.prompt_length].tolist() == think  # the empty block, then scored
    assert not set(think) & set(on.input_ids.tolist())
    assert off.input_ids[:on.prompt_length].tolist() == on.input_ids[:on.prompt_length].tolist()
    assert off.words == on.words and off.player_spans == on.player_spans
    templated = tok.apply_chat_template([{"role": "user", "content": TEXT}], add_generation_prompt=True, **OFF)
    templated = list(templated["input_ids"] if hasattr(templated, "keys") else templated)
    assert off.input_ids[:off.prompt_length].tolist() == list(templated)
    with torch.no_grad():  # the greedy target is the one after the thinking block
        assert off.target.tolist() == [int(model(input_ids=torch.tensor([templated])).logits[0, -1].argmax())]


@pytest.mark.parametrize("kwargs, chat, error, match", [
    (OFF, False, ValueError, "expected only with chat=True"),
    ("enable_thinking=False", True, TypeError, "expected a dict of chat template variables"),
    ({1: False}, True, TypeError, "expected string keys"),
    ({"enable_thinking": float("nan")}, True, TypeError, "expected JSON values"),
    ({"tokenize": False}, True, ValueError, r"received \['tokenize'\], which apply_chat_template takes"),
])
def test_bad_kwargs_are_refused(model, tok, kwargs, chat, error, match):
    with pytest.raises(error, match=match):
        Game.from_text(model, tok, TEXT, chat=chat, chat_template_kwargs=kwargs)


def test_a_thinking_switch_left_unset_is_warned_about_once(model, tok):
    with pytest.warns(UserWarning, match=r"enable_thinking.*chat_template_kwargs=\{'enable_thinking': False\}"):
        Game.from_text(model, tok, TEXT, chat=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Game.from_text(model, tok, "the red sun", chat=True)  # once per template
        Game.from_text(model, tok, TEXT, chat=True, chat_template_kwargs=OFF)
        Game.from_text(model, tok, TEXT, chat=True, chat_template_kwargs={"enable_thinking": True})
        Game.from_text(model, word_tokenizer(), TEXT, chat=True)  # a template without a switch
        Game.from_text(model, tok, TEXT)  # no chat


def test_a_generation_prompt_that_opens_think_is_warned_about(model):
    tok = _tokenizer(OPEN_THINK_TEMPLATE)
    with pytest.warns(UserWarning, match="generation prompt opens <think> without closing it"):
        Game.from_text(model, tok, TEXT, chat=True)
    sftint_fast.game._WARNED_THINKING.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Game.from_text(model, tok, TEXT, chat=True, chat_template_kwargs={"reasoning": "kept on purpose"})


def test_scan_probes_scores_the_prompt_the_kwargs_render(model, tok):
    probe = Probe(prompt=TEXT)
    with pytest.warns(UserWarning, match="enable_thinking"):
        default = scan_probes(model, tok, count=1, min_py=0, n_players=1, candidates=[probe], chat=True)
    off = scan_probes(model, tok, count=1, min_py=0, n_players=1, candidates=[probe], chat=True,
                      chat_template_kwargs=OFF)
    ids = prompt_ids(tok, TEXT, chat=True, chat_template_kwargs=OFF)
    assert ids[-2:] == _think_ids(tok)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    assert off[0].p_y == pytest.approx(float(p.max()), abs=1e-6) and off[0].p_y != default[0].p_y
    with pytest.raises(ValueError, match="expected only with chat=True"):
        scan_probes(model, tok, count=1, min_py=0, n_players=1, candidates=[probe], chat=False,
                    chat_template_kwargs=OFF)


def _tracker(tok, out_dir, **kw):
    return SFTTracker([TEXT, "a small dog ran fast"], tok, n_players=2, andor_method="and", min_base_py=0.0,
                      bootstrap=10, noise_floor=None, progress=False, numerics_check=False, out_dir=out_dir,
                      chat=True, **kw)


def test_the_tracker_renders_saves_and_compares_the_kwargs(model, tok, tmp_path):
    tracker = _tracker(tok, tmp_path, chat_template_kwargs=OFF)
    tracker.add_checkpoint(model, 0)
    for game in tracker.games:
        assert game.input_ids[game.prompt_length - 2:game.prompt_length].tolist() == _think_ids(tok)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tracker"]["chat_template_kwargs"] == OFF
    assert tracker.report().config["chat_template_kwargs"] == OFF
    assert _tracker(tok, tmp_path, chat_template_kwargs=OFF).steps == [0]  # the same: resumed
    for other in ({"enable_thinking": True}, None):
        with pytest.raises(ValueError, match=r"chat_template_kwargs.*use a new out_dir"):
            _tracker(tok, tmp_path, chat_template_kwargs=other)
    with pytest.raises(ValueError, match="expected only with chat=True"):
        SFTTracker([TEXT], tok, chat_template_kwargs=OFF)


def test_a_run_saved_before_the_option_resumes_with_the_default(model, tok, tmp_path):
    _tracker(tok, tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    del saved["tracker"]["chat_template_kwargs"]  # as an earlier version wrote it
    path.write_text(json.dumps(saved))
    _tracker(tok, tmp_path)
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        _tracker(tok, tmp_path, chat_template_kwargs=OFF)


def test_the_tracker_reference_games_use_the_kwargs(model, tok, monkeypatch):
    tracker = _tracker(tok, None, chat_template_kwargs=OFF, reference=(tiny_model("llama", seed=1), tok))
    tracker.add_checkpoint(model, 0)
    assert tracker.reference is not None
    seen = []
    real = Game.from_text.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("chat_template_kwargs"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Game, "from_text", classmethod(spy))
    tracker._reference_interactions(None)  # the reference games, built again
    assert seen and all(s == OFF for s in seen)


def test_run_demo_checks_the_kwargs_before_loading_anything(tmp_path):
    from sftint_fast.sft.demo import run_demo

    with pytest.raises(TypeError, match="chat_template_kwargs: expected a dict"):
        run_demo(tmp_path, chat_template_kwargs="enable_thinking=False")


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("thinking")
    tiny_model("llama").save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def test_cli_explain_and_bench_pass_and_record_the_kwargs(thinking_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["explain", "--model", str(thinking_dir), "--text", TEXT, "--n-players", "2", "--chat",
                 "--chat-template-kwargs", '{"enable_thinking": false}', "--out", str(out), "--top", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["chat_template_kwargs"] == OFF
    tok = _tokenizer()
    assert config["input_ids"][-2:] == _think_ids(tok)
    bench = tmp_path / "bench.json"
    assert main(["bench", "--model", str(thinking_dir), "--text", TEXT, "--n-players", "2", "--chat",
                 "--chat-template-kwargs", '{"enable_thinking": false}', "--engines", "naive", "--out",
                 str(bench)]) == 0
    assert json.loads(bench.read_text())["config"]["chat_template_kwargs"] == OFF


@pytest.mark.parametrize("value, message", [
    ("{bad", "received invalid JSON '{bad'"),
    ("[1]", "received a JSON list '[1]'"),
    ('{"tokenize": false}', "which apply_chat_template takes as its own arguments"),
])
@pytest.mark.parametrize("command", [["explain", "--chat"], ["bench", "--chat"], ["probes", "--chat"],
                                     ["track", "--chat"], ["demo"]], ids=lambda c: c[0])
def test_cli_refuses_a_bad_json_value(command, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--chat-template-kwargs", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --chat-template-kwargs: expected" in err and message in err


@pytest.mark.parametrize("command", [
    ["explain", "--text", TEXT], ["bench", "--text", TEXT], ["probes", "--out", "probes.jsonl"],
    ["track", "--base", "b", "--checkpoints", "c", "--probes", "p.jsonl", "--out", "o"],
])
def test_cli_refuses_the_kwargs_without_chat(command, thinking_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": TEXT}) + "\n")
    model = [] if command[0] == "track" else ["--model", str(thinking_dir)]
    assert main([*command, *model, "--chat-template-kwargs", '{"enable_thinking": false}']) == 2
    err = capsys.readouterr().err
    assert "--chat-template-kwargs: expected only with --chat, received --chat-template-kwargs" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "probes.jsonl").exists()


# modelled on Qwen3's too, with the assistant turn as it renders the last one: an empty thinking block before the
# content, so the generation prompt with enable_thinking=false is how that turn starts
CLOSED_THINK_TEMPLATE = ("{% for m in messages %}<bos> {{ m['role'] }} : "
                         "{% if m['role'] == 'assistant' %}<think> </think> {% endif %}{{ m['content'] }} <eos> "
                         "{% endfor %}{% if add_generation_prompt %}<bos> assistant : "
                         "{% if enable_thinking is defined and enable_thinking is false %}<think> </think> {% endif %}"
                         "{% endif %}")
HELDOUT = [("what is the capital of france", "paris"), ("who ran fast", "the big dog ran very fast")]


def _labelled(example):
    return [t for t in example["labels"] if t != -100]


def test_sft_examples_label_the_answer_after_the_prompt_the_kwargs_render():
    tok = _tokenizer(CLOSED_THINK_TEMPLATE)
    answer = tok("paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    off = sft_example(tok, *HELDOUT[0], chat_template_kwargs=OFF)
    assert _labelled(off) == answer
    assert _labelled(sft_example(tok, *HELDOUT[0]))[:2] == _think_ids(tok)  # the default: the block is labelled
    with pytest.raises(TypeError, match="chat_template_kwargs: expected a dict"):
        sft_example(tok, *HELDOUT[0], chat_template_kwargs="enable_thinking=False")


def test_a_template_whose_prompt_is_no_prefix_of_the_chat_is_refused_naming_the_kwargs(tok):
    """THINKING_TEMPLATE renders the empty thinking block in the generation prompt only: the answer's tokens cannot
    be told apart from the prompt's, so the held-out loss (and the demo's training labels) would be wrong."""
    message = (r"rendered with chat_template_kwargs=\{'enable_thinking': False\}, received a full chat that differs "
               r"from token \d+ on \(prompt: '<think> </think>', full chat: 'paris <eos>'\)")
    with pytest.raises(ValueError, match=message):
        sft_example(tok, *HELDOUT[0], chat_template_kwargs=OFF)
    with pytest.raises(ValueError, match=message):  # when the tracker is made, not at a checkpoint
        _tracker(tok, None, chat_template_kwargs=OFF, heldout=HELDOUT)
    sft_example(tok, *HELDOUT[0])  # without the kwargs the prompt is a prefix


def test_the_heldout_loss_is_taken_on_the_chats_the_kwargs_render(model):
    tok = _tokenizer(CLOSED_THINK_TEMPLATE)
    losses = {}
    for name, kwargs in (("off", OFF), ("on", {"enable_thinking": True})):
        tracker = _tracker(tok, None, chat_template_kwargs=kwargs, heldout=HELDOUT)
        tracker.add_checkpoint(model, 0)
        losses[name] = tracker.report().curves["heldout_loss"][0]
    total, count = 0.0, 0
    with torch.no_grad():
        for pair in HELDOUT:
            example = sft_example(tok, *pair, chat_template_kwargs=OFF)
            assert _think_ids(tok)[0] not in _labelled(example)
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(example["labels"][1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    assert losses["off"] == pytest.approx(total / count, rel=1e-5)
    assert abs(losses["off"] - losses["on"]) > 1e-3  # enable_thinking=true labels the thinking block too
    batch = next(heldout_batches(HELDOUT[:1], tok, chat_template_kwargs=OFF))
    assert batch["labels"][0].tolist() == sft_example(tok, *HELDOUT[0], chat_template_kwargs=OFF)["labels"]


def test_demo_trains_on_the_chats_the_kwargs_render_and_reports_them(tmp_path, monkeypatch, capsys):
    """`sftint demo --chat-template-kwargs`: the probes, the training chats and the held-out chats all rendered with
    them, and report.md says which."""
    import functools

    import sftint_fast as sf
    import sftint_fast.sft.demo as demo
    from sftint_fast.sft.probes import save_probes

    tok = _tokenizer(CLOSED_THINK_TEMPLATE)
    words = "the big cat sat on a red mat and the small dog ran very fast over the blue river".split()
    pairs = [(" ".join(words[i:i + 6]), " ".join(words[i + 6:i + 8])) for i in range(10)]
    monkeypatch.setattr(demo, "chatterbot_pairs", lambda: pairs)
    monkeypatch.setattr(sf, "load_default", lambda: (tiny_model("llama"), tok), raising=False)
    monkeypatch.setattr(demo, "_reference", lambda: None)
    monkeypatch.setattr(demo, "SFTTracker", functools.partial(demo.SFTTracker, min_base_py=0.0, bootstrap=20,
                                                              numerics_check=False))
    trained = []
    real = demo.sft_example
    monkeypatch.setattr(demo, "sft_example", lambda *a, **kw: trained.append(real(*a, **kw)) or trained[-1])
    save_probes([Probe("the big cat sat on the red mat")], tmp_path / "probes.jsonl")
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "1", "--every", "1", "--n-players", "3", "--andor-method", "and",
                 "--out", str(out), "--probes-file", str(tmp_path / "probes.jsonl"),
                 "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    assert trained and all(_labelled(e)[0] not in _think_ids(tok) for e in trained)
    assert json.loads((out / "tracker" / "config.json").read_text())["tracker"]["chat_template_kwargs"] == OFF
    assert '- chat template variables (chat_template_kwargs): `{"enable_thinking": false}`' in \
        (out / "report.md").read_text()
    with pytest.raises(ValueError, match=r"differs in \(saved, given\): \{'chat_template_kwargs': "
                                         r"\(\{'enable_thinking': False\}, \{'enable_thinking': True\}\)\}"):
        monkeypatch.setattr(sf, "load_default", lambda: pytest.fail("loaded the model"), raising=False)
        demo.run_demo(out, steps=1, every=1, n_players=3, andor_method="and", progress=False,
                      probes_file=tmp_path / "probes.jsonl", chat_template_kwargs={"enable_thinking": True})


def test_cli_track_renders_the_heldout_pairs_with_the_kwargs(thinking_dir, tmp_path, capsys):
    """`sftint track --heldout --chat-template-kwargs`: the held-out chats are rendered with them, so a template
    whose generation prompt then is no prefix of the chat (THINKING_TEMPLATE) is refused before anything is saved."""
    import shutil

    shutil.copytree(thinking_dir, tmp_path / "checkpoint-10")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": TEXT}) + "\n")
    (tmp_path / "h.jsonl").write_text(json.dumps({"prompt": HELDOUT[0][0], "answer": HELDOUT[0][1]}) + "\n")
    command = ["track", "--base", str(thinking_dir), "--checkpoints", str(tmp_path / "checkpoint-10"), "--probes",
               str(tmp_path / "p.jsonl"), "--heldout", str(tmp_path / "h.jsonl"), "--out", str(tmp_path / "run"),
               "--chat", "--n-players", "2", "--andor-method", "and", "--noise-floor", "none", "--device", "cpu",
               "--min-base-py", "0"]
    assert main([*command, "--chat-template-kwargs", '{"enable_thinking": false}']) == 2
    err = capsys.readouterr().err
    assert "rendered with chat_template_kwargs={'enable_thinking': False}" in err and "prefix" in err
    assert not (tmp_path / "run" / "tracker" / "config.json").exists()
