"""Sharding, keys and resume in-process (stand-in evaluate), and 2-rank gloo runs under torchrun vs one process."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftint_fast import distributed as D

SCRIPT = Path(__file__).parent / "dist_scripts" / "evaluate_games.py"
sys.path.insert(0, str(SCRIPT.parent))

from conftest import tiny_model  # noqa: E402
from evaluate_games import make_games  # noqa: E402


# ---------------------------------------------------------------- pure logic, one process


@pytest.mark.parametrize("costs,ranks", [([5, 1, 1, 1, 1, 1], 2), ([3, 3, 3], 2), ([7], 2), ([], 3),
                                         ([1, 2, 3, 4, 5, 6, 7], 3), ([2, 2], 4)],
                         ids=["heavy-first", "odd-count", "one-item", "empty", "seven-on-three", "more-ranks"])
def test_assign_shards_partitions_and_balances(costs, ranks):
    shards = D.assign_shards(costs, ranks)
    assert len(shards) == ranks
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    assert all(s == sorted(s) for s in shards)
    loads = [sum(costs[i] for i in s) for s in shards]
    # LPT guarantee: the heaviest rank exceeds the lightest by at most the largest single item
    assert max(loads) - min(loads) <= max(costs, default=0)
    assert D.assign_shards(costs, ranks) == shards


def test_assign_shards_spreads_items_that_cost_nothing():
    """Zero costs (user costs, or games of empty subset lists) left every load at 0, and ties went to rank 0: every
    item on one rank while the others idled. Ties now go to the rank with fewer items."""
    assert D.assign_shards([0.0] * 5, 2) == [[0, 2, 4], [1, 3]]
    assert D.assign_shards([4.0, 0.0, 0.0, 0.0], 2) == [[0], [1, 2, 3]]  # the zero-cost items balance the count


def test_assign_shards_rejects_bad_world():
    with pytest.raises(ValueError, match="num_ranks"):
        D.assign_shards([1.0], 0)


def test_single_process_helpers():
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main_process()
    assert D.shard_indices(4) == [0, 1, 2, 3]
    assert D.shard_probes(["a", "b"]) == [(0, "a"), (1, "b")]
    assert D.gather_metrics({3: "x"}) == {3: "x"}


def test_shutdown_destroys_the_group_after_a_barrier(tmp_path, monkeypatch):
    D.shutdown()  # no process group: nothing to do
    assert not D.is_distributed()
    calls = []
    real_barrier = torch.distributed.barrier
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: (calls.append("barrier"), real_barrier())[1])
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert D.is_distributed()
    D.shutdown(synchronize=False)  # an error path: straight to destroy
    assert calls == [] and not D.is_distributed()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    D.shutdown()
    assert calls == ["barrier"] and not D.is_distributed()


def test_game_cost_naive_and_trie():
    game = make_games(4)[3]  # 5 players
    assert D.game_cost(game, method="naive") == game.input_ids.numel() * 2**5
    assert 0 < D.game_cost(game) <= D.game_cost(game, method="naive")


def _many_player_game(n: int):
    import sftint_fast as sf

    gen = torch.Generator().manual_seed(n)
    return sf.Game(input_ids=torch.randint(3, 128, (2 * n + 3,), generator=gen),
                   player_spans=tuple((1 + 2 * i, 2 + 2 * i) for i in range(n)), words=tuple(f"w{i}" for i in range(n)),
                   target=torch.tensor([7]), baseline=torch.randn(32, generator=gen), prompt_length=2 * n + 3)


def _refuse_all_node_ids(monkeypatch):
    """Makes building the node ids of all 2^n variants of a large game fail at once (instead of exhausting memory)."""
    from sftint_fast.engine import plan

    real = plan._level_nodes

    def guarded(num_players, subsets):
        if subsets is None and num_players > 24:
            raise AssertionError(f"built the node ids of all 2^{num_players} variants")
        return real(num_players, subsets)

    monkeypatch.setattr(plan, "_level_nodes", guarded)


def test_game_cost_counts_the_sampled_variants(monkeypatch):
    """The cost of a sampled evaluation is that of its variants (the trie's compact plan), and the cost of all 2^n
    comes from n alone: a 40-player game is not planned over all of its 2^40 variants."""
    from sftint_fast.engine.plan import plan_trie

    _refuse_all_node_ids(monkeypatch)
    game = make_games(4)[3]  # 5 players
    subsets = torch.tensor([0, 3, 17, 31])
    assert D.game_cost(game, method="naive", subsets=subsets) == game.input_ids.numel() * 4
    assert D.game_cost(game, subsets=subsets) == plan_trie(game, subsets=subsets).trie_tokens
    assert D.game_cost(game) == plan_trie(game).trie_tokens
    big = _many_player_game(40)
    assert D.game_cost(big, subsets=torch.tensor([0, 5, (1 << 40) - 1])) < 3 * big.input_ids.numel()
    # |bg_0| + sum_j 2^(j+1) (|p_j| + |bg_j+1|): one-token players and gaps, 3 tokens after the last player
    assert D.game_cost(big) == 1 + sum((2 << j) * 2 for j in range(39)) + (1 << 40) * 4


def test_evaluate_many_with_out_dir_on_sampled_variants_of_many_players(tmp_path, tiny_llama, monkeypatch):
    import sftint_fast as sf

    _refuse_all_node_ids(monkeypatch)
    game = _many_player_game(40)
    subsets = torch.tensor([0, 5, (1 << 40) - 1])
    direct = sf.evaluate(tiny_llama, game, subsets=subsets, progress=False)
    sharded = sf.evaluate_many(tiny_llama, [game], subsets=subsets, out_dir=tmp_path, progress=False)
    torch.testing.assert_close(sharded[0], direct.cpu())


def test_game_key_changes_with_what_changes_values():
    a, b = make_games(2)
    key = D.game_key(a, model_key="m")
    assert key == D.game_key(make_games(1)[0], model_key="m")
    assert key != D.game_key(b, model_key="m")
    assert key != D.game_key(a, model_key="other")
    assert key != D.game_key(a, model_key="m", options={"subsets": torch.tensor([0, 1])})
    assert D.game_key(a, model_key="m", options={"subsets": torch.tensor([0, 1])}) != \
        D.game_key(a, model_key="m", options={"subsets": torch.tensor([0, 2])})


def test_game_key_changes_with_each_field_that_changes_values():
    """Each field of a game that changes its values changes its key (a resumed run would otherwise take one game's
    saved values for another's): masking, baseline values, player spans, target."""
    import dataclasses

    game = make_games(1)[0]  # 2 players (1, 2) and (3, 5), one target token: not in input_ids
    variants = {
        "same": dataclasses.replace(game),
        "masking": dataclasses.replace(game, masking="attention"),
        "baseline": dataclasses.replace(game, baseline=game.baseline + 1.0),
        "spans": dataclasses.replace(game, player_spans=((0, 2), (3, 5))),
        "target": dataclasses.replace(game, target=torch.where(game.target == 3, 4, 3)),
    }
    keys = {name: D.game_key(g, model_key="m") for name, g in variants.items()}
    assert keys["same"] == D.game_key(game, model_key="m")
    assert len(set(keys.values())) == len(keys), keys


@pytest.mark.parametrize("option, first, second", [("compute_dtype", "float32", "bfloat16"),
                                                    ("method", "naive", "trie"),
                                                    ("attention_backend", "torch", "triton")])
def test_evaluate_sharded_does_not_resume_values_of_another_value_option(tmp_path, option, first, second):
    """An option of sf.evaluate that changes the values (VALUE_OPTIONS) keys the shards: a rerun with another value of
    it evaluates again and returns its own values, not the first run's."""
    games = make_games(2)
    calls = []

    def evaluate(model, game, *, progress, **kwargs):
        calls.append(kwargs[option])
        scale = 1.0 if kwargs[option] == first else 2.0
        return scale * torch.arange(1 << game.num_players, dtype=torch.float32)

    runs = {value: D.evaluate_sharded(None, games, out_dir=tmp_path, model_key="m", evaluate_fn=evaluate,
                                      progress=False, **{option: value}) for value in (first, second)}
    assert calls == [first, first, second, second]
    for a, b in zip(runs[first], runs[second], strict=True):
        torch.testing.assert_close(b, 2 * a)


def _scaled(logits, scale=1.0):
    return logits[:, -1, 0] * scale


def _scaler(k):
    return lambda logits: logits[:, -1, 0] * k


def test_game_key_tells_value_functions_by_what_they_were_made_with():
    """A functools.partial or a closure enters the key with its arguments / cells: two of them in one out_dir must not
    share shards (the name alone is 'functools.partial' or 'make.<locals>.<lambda>' for all)."""
    import dataclasses
    import functools

    game = make_games(1)[0]

    def key(value):
        return D.game_key(dataclasses.replace(game, value=value), model_key="m")

    assert key(functools.partial(_scaled, scale=2.0)) == key(functools.partial(_scaled, scale=2.0))
    assert key(functools.partial(_scaled, scale=2.0)) != key(functools.partial(_scaled, scale=3.0))
    assert key(_scaler(2)) == key(_scaler(2)) != key(_scaler(3))
    assert key(_scaler(torch.ones(3))) != key(_scaler(torch.zeros(3)))
    assert key(_scaled) != key(functools.partial(_scaled, scale=2.0))
    assert D._value_name(torch.sigmoid) == "torch._VariableFunctionsClass.sigmoid"  # no state: the name as before
    # the same key in another process (ranks compare keys): nothing in it may depend on memory addresses
    _same_names_in_another_process("functools.partial(t._scaled, scale=2.0)", "t._scaler(torch.ones(3))")


def test_game_key_tells_apart_value_functions_of_one_name_by_their_code(tmp_path, tiny_llama):
    """Two lambdas of one module share the name '<module>.<lambda>' and have no closure: evaluate_many with one
    out_dir gave the second the first one's saved values."""
    import dataclasses

    import sftint_fast as sf

    game = make_games(1)[0]
    first = dataclasses.replace(game, value=lambda logits: logits[:, -1, 5])
    second = dataclasses.replace(game, value=lambda logits: logits[:, -1, 7])
    sf.evaluate_many(tiny_llama, [first], out_dir=tmp_path, progress=False)
    resumed = sf.evaluate_many(tiny_llama, [second], out_dir=tmp_path, progress=False)[0]
    torch.testing.assert_close(resumed, sf.evaluate(tiny_llama, second, progress=False).cpu())
    same = dataclasses.replace(game, value=lambda logits: logits[:, -1, 5])  # the same code: the same key
    assert D.game_key(same, model_key="m") == D.game_key(first, model_key="m")
    # and the same name in another process: nothing in the code's part may depend on addresses or hash seeds
    _same_names_in_another_process("t._scaled", "t._with_nested_code")


def _same_names_in_another_process(*values: str) -> None:
    """``D._value_name`` of each value (an expression over this module as ``t``) is the same in a fresh process."""
    import functools
    import subprocess
    import sys

    names = {"functools": functools, "torch": torch, "t": sys.modules[__name__]}
    code = ("import functools, torch, test_distributed as t; from sftint_fast import distributed as D; "
            f"print(*(D._value_name(x) for x in ({', '.join(values)},)))")
    here = " ".join(D._value_name(eval(value, names)) for value in values)
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).parent).stdout.strip()
    assert there == here.replace("tests.test_distributed", "test_distributed").replace(f"{__name__}.",
                                                                                        "test_distributed.")


class _Pick:
    """A value function as a callable object: what it picks is in its state, not in its code."""

    def __init__(self, index):
        self.index = index

    def __call__(self, logits):
        return logits[:, -1, self.index]

    def pick(self, logits):
        return logits[:, -1, self.index]


def test_game_key_tells_apart_callable_objects_by_what_they_hold(tmp_path, tiny_llama):
    """Two instances of one class (or bound methods of two instances) keyed by the class's name alone: evaluate_many
    with one out_dir gave _Pick(7) the saved values of _Pick(5). Their attributes now enter the key."""
    import dataclasses

    import sftint_fast as sf

    game = make_games(1)[0]

    def key(value):
        return D.game_key(dataclasses.replace(game, value=value), model_key="m")

    assert key(_Pick(5)) == key(_Pick(5)) != key(_Pick(7))
    assert key(_Pick(5).pick) == key(_Pick(5).pick) != key(_Pick(7).pick)
    assert key(_Pick(torch.ones(2))) != key(_Pick(torch.zeros(2)))
    first, second = (dataclasses.replace(game, value=_Pick(i)) for i in (5, 7))
    sf.evaluate_many(tiny_llama, [first], out_dir=tmp_path, progress=False)
    resumed = sf.evaluate_many(tiny_llama, [second], out_dir=tmp_path, progress=False)[0]
    assert torch.equal(resumed, sf.evaluate(tiny_llama, second, progress=False).cpu())
    _same_names_in_another_process("t._Pick(5)", "t._Pick(5).pick", "t._Pick(torch.ones(3))")


def _with_nested_code(logits):
    pick = lambda x: x[:, -1, 0]  # noqa: E731 - a nested code object among the constants
    return pick(logits) if logits.shape[0] not in {1, 2, "a", "b"} else pick(logits) * 2


def test_model_fingerprint_tracks_weights(tiny_llama):
    before = D.model_fingerprint(tiny_llama)
    assert before == D.model_fingerprint(tiny_llama)
    with torch.no_grad():
        next(tiny_llama.parameters()).add_(1e-3)
    assert D.model_fingerprint(tiny_llama) != before


def test_model_fingerprint_tracks_config_and_buffers(tiny_llama):
    """Same weights, another config that changes values (or another RoPE buffer): saved shards must not be reused."""
    before = D.model_fingerprint(tiny_llama)
    tiny_llama.config.use_cache = not tiny_llama.config.use_cache  # gradient checkpointing does this mid-training
    assert D.model_fingerprint(tiny_llama) == before
    eps = tiny_llama.config.rms_norm_eps
    tiny_llama.config.rms_norm_eps = eps * 10
    changed = D.model_fingerprint(tiny_llama)
    tiny_llama.config.rms_norm_eps = eps
    assert changed != before and D.model_fingerprint(tiny_llama) == before
    name, buffer = next(iter(tiny_llama.named_buffers()))
    saved = buffer.clone()
    buffer.mul_(1.5)
    try:
        assert D.model_fingerprint(tiny_llama) != before, name
    finally:
        buffer.copy_(saved)



def test_model_fingerprint_ignores_settings_nested_in_sub_configs(tiny_llama):
    """A multimodal config holds its language model's config as ``text_config``: its use_cache (gradient
    checkpointing), _name_or_path and dtype were hashed (the skip list applied at the top level only), so the same
    weights fingerprinted differently; a setting that changes values still counts."""
    from transformers import LlavaConfig

    model = torch.nn.Linear(2, 2)
    model.config = LlavaConfig(text_config=tiny_llama.config.to_dict())
    before = D.model_fingerprint(model)
    text = model.config.text_config
    text.use_cache, text._name_or_path = not text.use_cache, "/elsewhere/checkpoint-10"
    text.output_hidden_states = True
    assert D.model_fingerprint(model) == before
    text.rms_norm_eps *= 10
    assert D.model_fingerprint(model) != before


def test_model_fingerprint_ignores_a_dynamic_rope_frequency_update():
    """A dynamic RoPE recomputes its ``inv_freq`` buffer in a forward longer than ``max_position_embeddings`` (HF
    ``dynamic_rope_update``) and resets it on a short one: the same model fingerprinted differently before and after
    (shards of a resumed run recomputed; ranks that saw other lengths refused as other models). Its
    ``original_inv_freq`` and the config still key the RoPE."""
    model = tiny_model("llama", max_position_embeddings=16,
                       rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    before = D.model_fingerprint(model)
    rotary = model.model.rotary_emb
    initial = rotary.inv_freq.clone()
    with torch.no_grad():
        model(torch.arange(3, 43)[None])
    assert not torch.equal(rotary.inv_freq, initial)  # the update happened
    assert D.model_fingerprint(model) == before
    with torch.no_grad():
        model(torch.arange(3, 8)[None])  # back to the original frequencies (inv_freq aliases original_inv_freq)
    assert D.model_fingerprint(model) == before
    with torch.no_grad():
        rotary.original_inv_freq.mul_(1.5)
    assert D.model_fingerprint(model) != before


def _fake_evaluate(calls):
    def evaluate(model, game, *, progress, **kwargs):
        calls.append(game.words[0])
        return game.input_ids.float().sum() * torch.arange(1 << game.num_players, dtype=torch.float32)
    return evaluate


def test_evaluate_sharded_resumes_from_saved_shards(tmp_path):
    games = make_games(5)
    calls: list[str] = []
    first = D.evaluate_sharded(None, games, out_dir=tmp_path, model_key="m", evaluate_fn=_fake_evaluate(calls),
                               progress=False)
    assert len(calls) == 5 and len(list(tmp_path.glob("shard-*.safetensors"))) == 5
    expected = [_fake_evaluate([])(None, g, progress=False) for g in games]
    assert all(torch.equal(x, y) for x, y in zip(first, expected))
    next(iter(sorted(tmp_path.glob("shard-*.safetensors")))).unlink()
    again = D.evaluate_sharded(None, games, out_dir=tmp_path, model_key="m", evaluate_fn=_fake_evaluate(calls),
                               progress=False)
    assert len(calls) == 6  # only the deleted shard was recomputed
    assert all(torch.equal(x, y) for x, y in zip(again, expected))
    D.evaluate_sharded(None, games, out_dir=tmp_path, model_key="other", evaluate_fn=_fake_evaluate(calls),
                       progress=False)
    assert len(calls) == 11  # other weights: nothing reused


def test_evaluate_sharded_names_no_rank_without_a_process_group(tmp_path, capsys, caplog):
    """Outside torchrun the bar read 'games (rank 0)' and the resume message 'rank 0: 2 of 3 games resumed': the
    rank is named under a process group only (test_cli_explain_many checks 'games (rank 1)' under torchrun)."""
    games = make_games(3)
    D.evaluate_sharded(None, games[:2], out_dir=tmp_path, model_key="m", evaluate_fn=_fake_evaluate([]),
                       progress=False)
    with caplog.at_level("INFO", logger="sftint_fast.distributed"):
        D.evaluate_sharded(None, games, out_dir=tmp_path, model_key="m", evaluate_fn=_fake_evaluate([]))
    err = capsys.readouterr().err
    assert "games: " in err and "rank" not in err
    assert "2 of 3 games resumed from" in caplog.text and "rank" not in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "empty", "no v"])
def test_evaluate_sharded_evaluates_an_unreadable_shard_again(tmp_path, damage, caplog):
    """A shard file that cannot be read (cut short by a copy or a crash of the file system, not by our own writes,
    which are atomic) stopped every resumed run with safetensors' traceback, naming no file; now that game is
    evaluated again (with a warning naming the file) and its shard rewritten, the others still resumed."""
    from safetensors.torch import save_file

    games = make_games(3)
    calls: list[str] = []
    first = D.evaluate_sharded(None, games, out_dir=tmp_path, model_key="m", evaluate_fn=_fake_evaluate(calls),
                               progress=False)
    shard = sorted(tmp_path.glob("shard-*.safetensors"))[0]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:40])
    elif damage == "empty":
        shard.write_bytes(b"")
    else:
        save_file({"w": torch.zeros(2)}, str(shard))
    with caplog.at_level("WARNING", logger="sftint_fast.distributed"):
        again = D.evaluate_sharded(None, games, out_dir=tmp_path, model_key="m", evaluate_fn=_fake_evaluate(calls),
                                   progress=False)
    assert len(calls) == 4 and str(shard) in caplog.text  # that game alone, again
    assert all(torch.equal(x, y) for x, y in zip(again, first, strict=True))
    assert any(torch.equal(D.load_shard(shard), v) for v in first)  # rewritten whole


def test_evaluate_many_with_out_dir_resumes_and_matches_evaluate(tmp_path, tiny_llama):
    import sftint_fast as sf

    games = make_games(3)
    direct = [sf.evaluate(tiny_llama, g, method="naive", progress=False) for g in games]
    first = sf.evaluate_many(tiny_llama, games, out_dir=tmp_path, method="naive", progress=False)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.safetensors")}
    again = sf.evaluate_many(tiny_llama, games, out_dir=tmp_path, method="naive", progress=False)
    assert len(files) == 3 and files == {p: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.safetensors")}
    for a, b, ref in zip(first, again, direct, strict=True):
        assert torch.equal(a, ref.cpu()) and torch.equal(b, ref.cpu())


def test_shards_of_other_subsets_are_not_taken_for_each_other(tmp_path, tiny_llama):
    """The key hashed the subsets' bytes alone: int32 [3, 0] and int64 [3] are the same bytes, so a resumed run asking
    for two variants got the saved single value back. Subsets of any integer dtype key as the int64 they evaluate."""
    import sftint_fast as sf

    game = make_games(1)[0]
    one = sf.evaluate_many(tiny_llama, [game], out_dir=tmp_path, subsets=torch.tensor([3]), progress=False)[0]
    two = sf.evaluate_many(tiny_llama, [game], out_dir=tmp_path, subsets=torch.tensor([3, 0], dtype=torch.int32),
                           progress=False)[0]
    assert one.shape == (1,) and two.shape == (2,) and two[0] == one[0]
    same = sf.evaluate_many(tiny_llama, [game], out_dir=tmp_path, subsets=torch.tensor([3, 0], dtype=torch.int16),
                            progress=False)[0]
    assert torch.equal(same, two) and len(list(tmp_path.glob("shard-*.safetensors"))) == 2


def test_save_shard_leaves_no_temp_file_when_interrupted(tmp_path, monkeypatch):
    import safetensors.torch

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        D.save_shard(D.shard_path(tmp_path, "k"), torch.zeros(4), {"key": "k"})
    assert list(tmp_path.iterdir()) == []


def test_evaluate_sharded_takes_a_checkpoint_path_as_model_key(tmp_path):
    """model_key names the weights, "e.g. a checkpoint path": a pathlib.Path failed with json's 'Object of type
    PosixPath is not JSON serializable'. A path keys as its string; anything else is refused by name."""
    games = make_games(2)
    calls: list[str] = []
    first = D.evaluate_sharded(None, games, out_dir=tmp_path, model_key=tmp_path / "ckpt-10",
                               evaluate_fn=_fake_evaluate(calls), progress=False)
    again = D.evaluate_sharded(None, games, out_dir=tmp_path, model_key=str(tmp_path / "ckpt-10"),
                               evaluate_fn=_fake_evaluate(calls), progress=False)
    assert len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    with pytest.raises(TypeError, match="model_key: expected a string or a path.*received int"):
        D.evaluate_sharded(None, games, out_dir=tmp_path, model_key=10, evaluate_fn=_fake_evaluate(calls))


def test_evaluate_sharded_values_hold_their_own_game_only(tmp_path, tiny_llama):
    """The naive engine returns each game's v as a row of its group's (G, 2^n) output: kept as such, every value
    pickled the whole group (all_gather_object sent G times the data to every rank, and each rank unpickled G copies).
    Each value now holds its own 2^n floats."""
    import pickle

    import sftint_fast as sf

    games = make_games(12)[::4]  # 3 games of one layout: one group
    values = sf.evaluate_many(tiny_llama, games, out_dir=tmp_path, method="naive", progress=False)
    for v, game in zip(values, games, strict=True):
        assert v.untyped_storage().nbytes() == v.numel() * 4 == 4 << game.num_players
    assert len(pickle.dumps(values)) < len(pickle.dumps([v.clone() for v in values])) + 100


@pytest.mark.parametrize("env, warned", [({"WORLD_SIZE": "2", "RANK": "1"}, True), ({"RANK": "1"}, True),
                                         ({"WORLD_SIZE": "1", "RANK": "0"}, False), ({}, False)],
                         ids=["torchrun", "rank-only", "one-rank", "plain"])
def test_evaluate_many_under_torchrun_without_a_process_group_says_it_does_not_shard(tiny_llama, monkeypatch, caplog,
                                                                                    env, warned):
    """Under torchrun with no process group initialised every rank evaluated every game (and wrote every shard), which
    the README's "under torchrun evaluate_many shards the games" does not lead one to expect, and said nothing: one
    warning per process says so and what to call."""
    import sftint_fast as sf

    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(D, "_warned_without_group", False)
    games = make_games(2)
    with caplog.at_level("WARNING", logger="sftint_fast.distributed"):
        for _ in range(2):
            sf.evaluate_many(tiny_llama, games, method="naive", progress=False)
    messages = [r.getMessage() for r in caplog.records if "init_from_env" in r.getMessage()]
    assert len(messages) == (1 if warned else 0), messages


@pytest.mark.parametrize("value", ["two", "-1", "2.0"])
def test_init_from_env_names_a_bad_world_size(monkeypatch, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(ValueError, match=rf"WORLD_SIZE must be a non-negative integer.*{value[1:]}"):
        D.init_from_env()


def test_init_from_env_single_process_without_group(monkeypatch):
    for value in ("", "1", " 1 "):
        monkeypatch.setenv("WORLD_SIZE", value)
        assert D.init_from_env() is False
    monkeypatch.delenv("WORLD_SIZE")
    assert D.init_from_env() is False


def test_evaluate_sharded_rejects_non_games():
    with pytest.raises(TypeError, match=r"games\[1\]"):
        D.evaluate_sharded(None, [make_games(1)[0], "text"], evaluate_fn=_fake_evaluate([]))
    with pytest.raises(ValueError, match="one cost per game"):
        D.evaluate_sharded(None, make_games(2), costs=[1.0], evaluate_fn=_fake_evaluate([]))


# ---------------------------------------------------------------- torchrun, 2 gloo ranks on CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp: Path, name: str, *args: str, nproc: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    launcher = [sys.executable]
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd = launcher + [str(SCRIPT), "--out", str(tmp / f"{name}.safetensors"), "--count-dir", str(tmp / name), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _load(path: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    values = load_file(str(path))
    return [values[f"v{i}"] for i in range(len(values))]


def _game_id(shard: Path) -> str:
    """The game a shard file holds (``g<i>``, from the words saved in its metadata)."""
    import json

    from safetensors import safe_open

    with safe_open(str(shard), "pt") as f:
        return json.loads(f.metadata()["words"])[0].split("w")[0]


def _counts(folder: Path) -> list[str]:
    return [line for f in sorted(folder.glob("rank*.txt")) for line in f.read_text().split()]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    """The reference: the same script, 9 games, one plain process (no process group)."""
    tmp = tmp_path_factory.mktemp("single")
    _run(tmp, "single", "--num-games", "9")
    assert sorted(_counts(tmp / "single")) == sorted(f"g{i}" for i in range(9))
    return tmp, _load(tmp / "single.safetensors")


def test_torchrun_matches_single_process_and_resumes_after_a_crash(tmp_path, single_process):
    games = "--num-games", "9"  # 9 games of 2..5 players: uneven counts and costs on 2 ranks
    reference = single_process[1]
    shards = str(tmp_path / "shards")
    crashed = _run(tmp_path, "crash", *games, "--shard-dir", shards, "--crash-after", "2", nproc=2, check=False)
    assert crashed.returncode != 0
    saved = set(Path(shards).glob("shard-*.safetensors"))
    saved_games = {_game_id(path) for path in saved}
    first = _counts(tmp_path / "crash")
    assert len(saved) >= 2 and saved_games <= set(first) and len(first) < 9  # rank 0 died before its 3rd game

    _run(tmp_path, "resume", *games, "--shard-dir", shards, nproc=2)
    second = _counts(tmp_path / "resume")
    assert not saved_games & set(second) and len(second) == len(set(second))  # finished shards not recomputed
    assert set(first) | set(second) == {f"g{i}" for i in range(9)}
    assert saved <= set(Path(shards).glob("shard-*.safetensors"))
    resumed = _load(tmp_path / "resume.safetensors")
    for v, ref in zip(resumed, reference, strict=True):
        assert torch.equal(v, ref), (v - ref).abs().max()


def test_torchrun_evaluate_many_with_a_rank_without_games(tmp_path, single_process):
    """1 game on 2 ranks through ``sf.evaluate_many``: rank 1 idles, both get the game's exact ``v``."""
    shards = tmp_path / "shards"
    _run(tmp_path, "two", "--num-games", "1", "--many", "--shard-dir", str(shards), nproc=2)
    assert len(list(shards.glob("shard-*.safetensors"))) == 1
    (v,) = _load(tmp_path / "two.safetensors")
    assert torch.equal(v, single_process[1][0])


def test_torchrun_resumes_on_another_world_size_and_every_rank_returns_the_same_values(tmp_path, single_process):
    """9 games through ``sf.evaluate_many`` (grouped engine) on 2 ranks, then rerun by one process on the same shard
    folder: each game evaluated once in all, every shard reused (none rewritten), and every rank of every run returns
    the single process's values bitwise, in the games' order. (In-process, 2 -> 1 -> 3 -> 7 ranks reused every
    shard too; one torchrun world-size change is kept here for CI time.)"""
    shards = tmp_path / "shards"
    games = "--num-games", "9", "--many", "--every-rank", "--shard-dir", str(shards)
    _run(tmp_path, "two", *games, nproc=2)
    assert sorted(_counts(tmp_path / "two")) == sorted(f"g{i}" for i in range(9))
    saved = {path: path.stat().st_mtime_ns for path in shards.glob("shard-*.safetensors")}
    assert len(saved) == 9
    _run(tmp_path, "one", *games)
    assert _counts(tmp_path / "one") == []
    assert saved == {path: path.stat().st_mtime_ns for path in shards.glob("shard-*.safetensors")}
    for path in (tmp_path / name for name in ("two.safetensors", "two.safetensors.rank1", "one.safetensors")):
        for v, ref in zip(_load(path), single_process[1], strict=True):
            assert torch.equal(v, ref), (path.name, (v - ref).abs().max())


# ---------------------------------------------------------------- 2 gloo ranks in-process (spawn), stand-in evaluate


def _two_ranks(tmp_path: Path, case: str, out_dir: Path | None = None) -> dict[int, tuple]:
    """``sharded_cases.run_case`` on 2 spawned gloo ranks: ``{rank: (evaluated, values, error)}``; a hang fails."""
    import torch.multiprocessing as mp
    from sharded_cases import run_case

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    out = str(out_dir if out_dir is not None else tmp_path / "shards")
    procs = [ctx.Process(target=run_case, args=(r, 2, str(tmp_path / "init"), case, out, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = {}
    try:
        for _ in procs:
            rank, evaluated, values, error = queue.get(timeout=90)
            results[rank] = (evaluated, values, error)
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    return results


@pytest.mark.parametrize("case, what", [("other-game", "games"), ("fewer-games", "number of games"),
                                        ("other-model", "model"), ("other-options", "options"),
                                        ("other-costs", "costs")])
def test_evaluate_sharded_refuses_ranks_that_disagree(tmp_path, case, what):
    """Every rank splits the games by the same assignment, so ranks with other games, weights, options or costs mixed
    their results silently (another game's values, another model's) or failed with a bare KeyError: refused on every
    rank, before anything is evaluated, naming what differs."""
    results = _two_ranks(tmp_path, case)
    for rank, (evaluated, values, error) in results.items():
        assert values is None and evaluated == [], (rank, values, error)
        assert error.startswith("ValueError") and f"the same {what}" in error and "rank 1" in error, error
    assert not list((tmp_path / "shards").glob("shard-*"))


def test_evaluate_sharded_reports_a_failing_rank_on_every_rank(tmp_path):
    """A rank whose evaluation (or shard write) fails raises its error; the others raised gloo's 'Connection closed by
    peer' (or waited for it): they now raise a RuntimeError that names the rank and its error, and keep their shards."""
    results = _two_ranks(tmp_path, "write-fails")
    assert results[1][2] == f"OSError: {tmp_path / 'shards'}: disk full"
    evaluated, values, error = results[0]
    assert values is None and error.startswith("RuntimeError") and "rank 1" in error and "disk full" in error, error
    assert len(list((tmp_path / "shards").glob("shard-*.safetensors"))) == len(evaluated) > 0


@pytest.mark.parametrize("count", [0, 1, 3])
def test_evaluate_sharded_on_two_ranks_evaluates_each_game_once(tmp_path, count):
    """Fewer games than ranks (and none): each game evaluated by one rank, every rank returns all values in order; a
    rerun on the same out_dir evaluates nothing and returns the same."""
    from sharded_cases import fake_value

    expected = [fake_value(g).tolist() for g in make_games(count)]
    for _ in range(2):
        results = _two_ranks(tmp_path, f"games-{count}")
        assert all(error is None and values == expected for _, values, error in results.values()), results
        evaluated = sorted(i for done, _, _ in results.values() for i in done)
        assert evaluated == (list(range(count)) if _ == 0 else [])
        (tmp_path / "init").unlink(missing_ok=True)


def test_evaluate_sharded_evaluates_a_damaged_shard_of_one_rank_again_on_two_ranks(tmp_path):
    """A shard file that cannot be read (resume) raised safetensors' bare 'HeaderTooLarge' on its rank and gloo's
    'Connection closed by peer' on the others: its game is evaluated again (with a warning naming the file), and both
    ranks return every value."""
    results = _two_ranks(tmp_path, "corrupt-shard")
    assert results[0][2] is None and results[1][2] is None, results
    assert results[0][1] == results[1][1] and len(results[0][1]) == 5  # every value on both ranks
    assert sorted(results[0][0] + results[1][0]) == list(range(5))  # the damaged game evaluated, once