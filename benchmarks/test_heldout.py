"""The tracker's held-out loss: the LM head on the answer positions only (``logits_to_keep``) vs full logits.

Same random-init Llama (2 layers, hidden 64, a real-size vocabulary), same batches, one process, timed in the same
run (interleaved, median of 3). Quick: vocabulary 32k, 8 x 128 tokens, 16-token answers; ``--full``: the Llama-3
vocabulary (128,256) and 8 x 512 tokens. Peak memory is the process RSS above the start (CPU) or the allocator's
peak (CUDA), from ``sftint_fast.bench.measure``.
"""
from __future__ import annotations

import statistics

import torch

from sftint_fast.bench import measure
from sftint_fast.sft.tracker import causal_lm_loss


class _FullLogits(torch.nn.Module):
    """The same model with a forward that has no ``logits_to_keep``: full logits, sliced by ``causal_lm_loss``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_heldout_loss_answer_positions_vs_full_logits(benchmark, full, env_info):
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab, length, answer = (128256, 512, 16) if full else (32000, 128, 16)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_config(cfg).eval().to(device)
    ids = torch.randint(0, vocab, (8, length), device=device)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    runs = {"answer_positions": lambda: causal_lm_loss(model, ids, labels),
            "full_logits": lambda: causal_lm_loss(_FullLogits(model), ids, labels)}
    with torch.no_grad():
        results = {name: fn() for name, fn in runs.items()}  # warm-up, and the values compared
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(3):
            for name, fn in runs.items():
                times[name].append(measure(fn, device)[1])
        peaks = {name: measure(fn, device)[2] for name, fn in runs.items()}
        benchmark.pedantic(runs["answer_positions"], rounds=1, iterations=1)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    info = dict(env_info, vocab=vocab, batch=8, length=length, answer_tokens=answer,
                answer_positions_ms=seconds["answer_positions"] * 1e3, full_logits_ms=seconds["full_logits"] * 1e3,
                speedup=seconds["full_logits"] / seconds["answer_positions"],
                peak_MB_answer_positions=peaks["answer_positions"] / 2**20,
                peak_MB_full_logits=peaks["full_logits"] / 2**20,
                loss_rel_diff=abs(results["answer_positions"][0] - results["full_logits"][0])
                / results["full_logits"][0])
    benchmark.extra_info.update(info)
    print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in info.items()})
    assert results["answer_positions"][1] == results["full_logits"][1] == 8 * answer
    assert info["loss_rel_diff"] < 1e-5
