"""Trie vs strong naive on every architecture the trie engine has an adapter for (fp32, CPU, one thread).

Each model type is a random-init model of one common size, built from its own config class: hidden 256, 4 layers,
8 query heads of 32 (4 KV heads where the type has GQA), vocab 2048, a 4x MLP (1024) or, for the Mixture-of-Experts
types, 8 experts of 512 with top-2 routing (the same active MLP width; Qwen2-MoE adds its shared expert of 512).
The attention is SDPA where the adapter takes it, eager where it refuses SDPA (gemma2, gpt_oss); the experts run as
transformers' default ``experts_implementation``. One prompt of 50 random tokens, ``n`` one-token players spread
through it, one target token, all ``2^n`` variants: ``evaluate_naive`` (strong naive) and ``evaluate_trie`` (default
backend) timed back to back in one run. Reports their times, the measured ratio, the plan's ideal token ratio, the
ratio over the ideal, the attention's own ideal ratio (query-key pairs, lower: the trie keeps every variant's late,
longest-attending queries) and the largest difference of values; asserts only that the two agree.
Quick: n=6 on llama, qwen3_moe and gpt_oss. ``--full``: every supported type at n=8 and n=10. The figures are
printed as a table at the end of the run.
"""
import pytest
import torch

from sftint_fast.bench import measure
from sftint_fast.engine.adapters import SUPPORTED, get_adapter
from sftint_fast.engine.naive import evaluate_naive
from sftint_fast.engine.plan import plan_trie
from sftint_fast.engine.trie import evaluate_trie
from sftint_fast.game import Game

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 256, 4, 8, 4, 32, 1024, 2048
EXPERTS, TOP_K, EXPERT_MLP = 8, 2, 512
PROMPT_TOKENS = 50
QUICK = ("llama", "qwen3_moe", "gpt_oss")
EAGER = ("gemma2", "gpt_oss")  # their adapters refuse SDPA (attention soft-cap, sinks)
# (model type, n, only with --full)
CASES = [(t, 6, False) for t in QUICK] + [(t, n, True) for n in (8, 10) for t in SUPPORTED]
TABLE = "trie vs strong naive per architecture (fp32, CPU, 1 thread; benchmarks/test_architectures.py)"
COLUMNS = ("model_type", "n", "attn", "experts", "params_M", "naive_s", "trie_s", "ratio", "ideal", "ratio/ideal",
           "attn_ideal", "max_abs_diff")


def _config(model_type: str):
    """The common-size config of ``model_type``, as its own config class."""
    from transformers import AutoConfig

    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    gqa = dict(common, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                    n_inner=MLP, n_positions=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gpt_neox":  # no GQA in GPT-NeoX
        return AutoConfig.for_model("gpt_neox", intermediate_size=MLP, **common)
    if model_type == "qwen3_moe":
        return AutoConfig.for_model(model_type, intermediate_size=MLP, moe_intermediate_size=EXPERT_MLP,
                                    num_experts=EXPERTS, num_experts_per_tok=TOP_K, **gqa)
    if model_type == "qwen2_moe":
        return AutoConfig.for_model(model_type, intermediate_size=MLP, moe_intermediate_size=EXPERT_MLP,
                                    num_experts=EXPERTS, num_experts_per_tok=TOP_K, decoder_sparse_step=1,
                                    shared_expert_intermediate_size=EXPERT_MLP, **gqa)
    if model_type == "gpt_oss":  # its default context (YaRN from 4096 to 131072): a shorter one makes YaRN warn
        del gqa["max_position_embeddings"]
    if model_type in ("mixtral", "gpt_oss"):
        return AutoConfig.for_model(model_type, intermediate_size=EXPERT_MLP, num_local_experts=EXPERTS,
                                    num_experts_per_tok=TOP_K, **gqa)
    if model_type == "olmoe":
        return AutoConfig.for_model(model_type, intermediate_size=EXPERT_MLP, num_experts=EXPERTS,
                                    num_experts_per_tok=TOP_K, **gqa)
    if model_type == "granite":  # Granite-3-like multipliers (the defaults are all 1)
        return AutoConfig.for_model(model_type, intermediate_size=MLP, embedding_multiplier=12.0,
                                    attention_multiplier=1 / HEAD_DIM, residual_multiplier=0.22, logits_scaling=8.0,
                                    **gqa)
    return AutoConfig.for_model(model_type, intermediate_size=MLP, **gqa)


def _model(model_type: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    attn = "eager" if model_type in EAGER else "sdpa"
    model = AutoModelForCausalLM.from_config(_config(model_type), attn_implementation=attn).eval()
    if get_adapter(model) is None:
        raise RuntimeError(f"{model_type}: no trie adapter for this model")
    return model


def _game(model: torch.nn.Module, n: int) -> Game:
    """50 random tokens, ``n`` one-token players from the second to the second-last token, one target token; the
    baseline is token 0's (the pad token's) embedding."""
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(3, VOCAB, (PROMPT_TOKENS,), generator=gen)
    positions = [round(1 + i * (PROMPT_TOKENS - 3) / (n - 1)) for i in range(n)]
    baseline = model.get_input_embeddings().weight[0].detach().clone()
    return Game(input_ids=ids, player_spans=tuple((p, p + 1) for p in positions), words=tuple(map(str, positions)),
                target=torch.randint(3, VOCAB, (1,), generator=gen), baseline=baseline, prompt_length=PROMPT_TOKENS)


def _attention_ratio(plan) -> float:
    """The plan's ideal ratio for the attention alone: query-key pairs of the naive variants (each position attends
    to itself and every earlier one) over the trie's (each node's segment attends to its path, as long as its
    position). Below the token ratio: the trie keeps the late, longest-attending queries of every variant."""
    naive = plan.naive_tokens // plan.seq_len * plan.seq_len * (plan.seq_len + 1) // 2
    trie = sum(len(nodes) * sum(range(start + 1, start + length + 1))
               for nodes, start, length in zip(plan.level_nodes, plan.level_positions, plan.level_lens))
    return naive / trie


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on the shared 2-core machine two threads swing up to 2x with load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def table(summary_tables):
    rows = summary_tables.setdefault(TABLE, [COLUMNS])
    return rows


@pytest.mark.parametrize("model_type,n,needs_full", CASES, ids=[f"{c[0]}-n{c[1]}" for c in CASES])
def test_architecture_speed(benchmark, model_type, n, needs_full, full, env_info, table):
    if needs_full and not full:
        pytest.skip("only with --full")
    model = _model(model_type)
    game = _game(model, n)
    subsets = torch.arange(1 << n)
    plan = plan_trie(game, subsets=subsets, model=model)
    with torch.no_grad():  # warm-up: allocator, thread pools, first-call paths
        evaluate_trie(model, game, subsets[:2], progress=False)
        evaluate_naive(model, game, subsets[:2], progress=False)
        naive, naive_s, _ = measure(lambda: evaluate_naive(model, game, subsets, progress=False))
    trie_box = {}

    def run_trie():
        with torch.no_grad():
            trie_box["out"] = measure(lambda: evaluate_trie(model, game, subsets, progress=False))
        return trie_box["out"][0]

    benchmark.pedantic(run_trie, rounds=1, iterations=1)
    trie, trie_s, _ = trie_box["out"]

    diff = (trie - naive).abs().max().item()
    tol = 1e-4 * naive.abs().clamp(min=1)
    assert bool(((trie - naive).abs() <= tol).all()), f"{model_type}: trie and naive differ by up to {diff}"
    ratio = naive_s / trie_s
    moe = any(name.endswith(".experts") for name, _ in model.named_modules())
    info = {
        "model_type": model_type, "n": n, "attn": model.config._attn_implementation,
        "experts": (getattr(model.config, "_experts_implementation", None) or "?") if moe else "-",
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "naive_s": round(naive_s, 3), "trie_s": round(trie_s, 3), "ratio": round(ratio, 2),
        "ideal": round(plan.ideal_ratio, 2), "ratio/ideal": round(ratio / plan.ideal_ratio, 2),
        "attn_ideal": round(_attention_ratio(plan), 2),
        "max_abs_diff": f"{diff:.1e}",
    }
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({
        "model_type": model_type, "dtype": "float32", "n": n, "seq_len": plan.seq_len, "variants": len(subsets),
        "attn_implementation": info["attn"], "experts_implementation": info["experts"], "params_M": info["params_M"],
        "time_naive": round(naive_s, 4), "time_trie": round(trie_s, 4), "ratio": round(ratio, 3),
        "ideal_token_ratio": round(plan.ideal_ratio, 3), "ratio_over_ideal": round(ratio / plan.ideal_ratio, 3),
        "ideal_attention_pair_ratio": round(_attention_ratio(plan), 3),
        "trie_tokens": plan.trie_tokens, "naive_tokens": plan.naive_tokens, "max_abs_diff": diff,
    })
    table.append(tuple(info[c] for c in COLUMNS))
    print(benchmark.extra_info)
