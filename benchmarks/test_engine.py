"""Engine speed on the bundled SmolLM2-135M (fp32, CPU): lab-style naive vs strong naive vs the trie, one run.

(a) lab-style: every variant a full sequence, full-vocab logits at every position, batch 128;
(b) strong naive: ``evaluate_naive`` (LM head on the scored positions only, memory-sized batch);
(c) trie: ``evaluate_trie`` (its layer loop's RMSNorm, RoPE and SiLU gate as the C++ ops of
``sftint_fast.ops.layer_ops``), and (d) the same trie with the model's own modules (``SFTINT_FUSE_ELEMENTWISE=0``).
Quick: n=6 on a short QA prompt. ``--full``: n=8 and 10 on the QA prompt and on a ~120-token passage with the
players spread through it. Reports times, the plan's ideal token ratio, measured ratios and each method's peak RSS;
asserts only that what it timed agrees.
"""
from unittest import mock

import pytest
import torch

from sftint_fast.bench import measure, sample_subsets
from sftint_fast.engine.naive import evaluate_naive
from sftint_fast.engine import trie as trie_module
from sftint_fast.engine.plan import plan_trie
from sftint_fast.engine.trie import evaluate_trie
from sftint_fast.game import Game

QA = "Question: Which famous old city is the capital of France, the large country in western Europe? Answer:"
PASSAGE = (
    "The old lighthouse stood on a rocky point at the northern end of the island, where the cold sea met the "
    "warm current from the south. For more than a century its keepers had climbed the narrow stairs every "
    "evening to light the lamp, and sailors trusted its steady beam to guide them past the hidden reefs. When "
    "the last keeper retired, the village decided to turn the tower into a small museum about the history of "
    "the coast, its storms and its ships. Visitors now walk up the same stairs and look out over the water. "
    "The museum is located in the"
)
LAB_BATCH = 128
# (layout, n, only with --full, sampled variants or None for all 2^n)
CASES = [("qa", 6, False, None), ("qa", 8, True, None), ("qa", 10, True, None), ("qa", 11, True, 128),
         ("passage", 8, True, None), ("passage", 10, True, None), ("passage", 20, True, 256)]


@pytest.fixture(scope="module")
def smollm2():
    """The model, run on one thread: on the shared 2-core machine two threads swing up to 2x with load."""
    from sftint_fast.models import load_default

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_default()
    torch.set_num_threads(threads)


def _game(model, tokenizer, layout: str, n: int) -> Game:
    if layout == "qa":
        return Game.from_text(model, tokenizer, QA, players="words", n_players=n, pick="last")
    words = PASSAGE.split()
    spread = [round(i * (len(words) - 1) / (n - 1)) for i in range(n)]
    return Game.from_text(model, tokenizer, PASSAGE, players=spread)


def _lab_style(model, game: Game, subsets: torch.Tensor) -> torch.Tensor:
    embeds = model.get_input_embeddings()(game.input_ids[None])[0]
    m = game.target.numel()
    out = []
    for chunk in subsets.split(LAB_BATCH):
        logits = model(inputs_embeds=game.masked_embeds(embeds, chunk), use_cache=False).logits
        out.append(game.values_from_logits(logits[:, -m:], subsets=chunk))
    return torch.cat(out)


def _timed(fn):
    """(result, seconds, peak RSS bytes above the starting RSS) of ``fn()`` under no_grad (sampled every 5 ms)."""
    with torch.no_grad():
        return measure(fn)


@pytest.mark.parametrize("layout,n,needs_full,sample", CASES,
                         ids=[f"{c[0]}-n{c[1]}" + (f"-sample{c[3]}" if c[3] else "") for c in CASES])
def test_engine_speed(benchmark, smollm2, layout, n, needs_full, sample, full, env_info):
    if needs_full and not full:
        pytest.skip("only with --full")
    model, tokenizer = smollm2
    game = _game(model, tokenizer, layout, n)
    subsets = torch.arange(1 << game.num_players) if sample is None else sample_subsets(game.num_players, sample)
    plan = plan_trie(game, subsets=subsets, model=model)
    with torch.no_grad():  # warm-up: allocator, thread pools, first-call paths
        evaluate_trie(model, game, subsets[:2], progress=False)
        evaluate_naive(model, game, subsets[:2], progress=False)

    lab, lab_s, lab_mem = _timed(lambda: _lab_style(model, game, subsets))
    with mock.patch.object(trie_module, "FUSE_ELEMENTWISE", False):
        modules, modules_s, _ = _timed(lambda: evaluate_trie(model, game, subsets, progress=False))
    naive, naive_s, naive_mem = _timed(lambda: evaluate_naive(model, game, subsets, progress=False))
    trie_box = {}

    def run_trie():
        trie_box["out"] = _timed(lambda: evaluate_trie(model, game, subsets, progress=False))
        return trie_box["out"][0]

    benchmark.pedantic(run_trie, rounds=1, iterations=1)
    trie, trie_s, trie_mem = trie_box["out"]

    tol = 1e-4 * naive.abs().clamp(min=1)
    assert bool(((trie - naive).abs() <= tol).all()), (trie - naive).abs().max().item()
    assert bool(((lab - naive).abs() <= tol).all()), (lab - naive).abs().max().item()
    assert bool(((modules - naive).abs() <= tol).all()), (modules - naive).abs().max().item()
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({
        "model": "SmolLM2-135M-Instruct", "dtype": "float32", "layout": layout, "n": game.num_players,
        "seq_len": plan.seq_len, "variants": len(subsets), "ideal_token_ratio": round(plan.ideal_ratio, 3),
        "trie_tokens": plan.trie_tokens, "naive_tokens": plan.naive_tokens,
        "lab_s": round(lab_s, 3), "strong_naive_s": round(naive_s, 3), "trie_s": round(trie_s, 3),
        "trie_over_strong_naive": round(naive_s / trie_s, 3), "trie_over_lab": round(lab_s / trie_s, 3),
        "trie_vs_ideal": round(naive_s / trie_s / plan.ideal_ratio, 3),
        "trie_with_modules_s": round(modules_s, 3), "fused_ops_speedup": round(modules_s / trie_s, 3),
        "peak_rss_mib": {"lab": lab_mem >> 20, "strong_naive": naive_mem >> 20, "trie": trie_mem >> 20},
        "plan_peak_estimate_mib": plan.peak_bytes >> 20, "compact_store": plan.compact,
        "kv_store_mib": plan.kv_bytes >> 20,
        "max_abs_diff_trie_naive": (trie - naive).abs().max().item(),
        "variants_per_s_trie": round(len(subsets) / trie_s, 1),
    })
    print(benchmark.extra_info)
