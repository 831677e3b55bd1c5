"""A tiny offline word-level tokenizer (fits the 128-token vocab of conftest.tiny_model) for game tests."""
from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3, as conftest.tiny_model's config expects
WORDS = ("the capital of france is paris a cat sat on mat dog ran fast , . ! ? hello world what who "
         "city big small red blue green tree house river sun moon star sky user assistant : answer good "
         "bad very not and or but").split()
CHAT_TEMPLATE = ("{% for m in messages %}<bos> {{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}<bos> assistant : {% endif %}")


def word_tokenizer(*, pad: bool = True, unk: bool = True) -> PreTrainedTokenizerFast:
    """Lower-case word-level tokenizer with offsets; punctuation is split off words (multi-token words)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"bos_token": "<bos>", "eos_token": "<eos>"}
    if pad:
        kwargs["pad_token"] = "<pad>"
    if unk:
        kwargs["unk_token"] = "<unk>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.chat_template = CHAT_TEMPLATE
    return fast


class NoOffsetsTokenizer:
    """Wraps a tokenizer and refuses ``return_offsets_mapping`` like a slow tokenizer does."""

    def __init__(self, inner: PreTrainedTokenizerFast):
        self.inner = inner
        self.all_special_ids = inner.all_special_ids

    def __call__(self, text, **kwargs):
        if kwargs.pop("return_offsets_mapping", False):
            raise NotImplementedError("return_offset_mapping is not available for this tokenizer")
        return self.inner(text, **kwargs)

    def decode(self, ids, **kwargs):
        return self.inner.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)
