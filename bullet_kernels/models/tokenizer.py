"""The project's own small byte-level BPE tokenizer, shipped for the random-weight presets.

Random weights need token ids, not meaning, but servers take text: our server and the SGLang
baseline must turn the same prompt into the same number of tokens, so both load this one file.
It is a byte-level BPE (every byte string encodes, nothing is unknown) that
``scripts/train_tokenizer.py`` trains with the ``tokenizers`` library on the repository's own
Python sources and docs at a pinned commit; the result is committed as ``assets/tokenizer.json``.

Ids 0 and 1 are ``<s>`` and ``</s>``, the bos/eos ids of the ``llama-3.1-8b`` preset; encoding
with special tokens prepends ``<s>``, as Llama 3 tokenizers prepend their begin-of-text token.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # tokenizers is imported where it is used: importing presets stays light
    from tokenizers import Tokenizer

BOS, EOS = "<s>", "</s>"
SPECIAL_TOKENS = (BOS, EOS)  # ids 0 and 1, in this order
VOCAB_SIZE = 4096  # 256 byte symbols + 2 specials + 3838 merges: small, still merges common words
ASSET = "tokenizer.json"


def asset_text(*parts: str) -> str:
    """Text of a file under ``bullet_kernels/models/assets/`` (works from a wheel or a checkout)."""
    node = resources.files("bullet_kernels.models").joinpath("assets", *parts)
    if not node.is_file():
        raise FileNotFoundError(f"bullet_kernels ships no asset assets/{'/'.join(parts)}; reinstall the package")
    return node.read_text(encoding="utf-8")


# What an id above the trained vocabulary decodes to in a model directory (:func:`padded_json`):
# " <id>" in the byte-level alphabet ("Ġ" is the space byte), which no merge of ours produces.
PAD_ENTRY = "Ġ<{}>"


def padded_json(text: str, vocab_size: int) -> str:
    """Tokenizer JSON ``text`` with its vocabulary padded to ``vocab_size`` ids by decode-only
    entries: id i decodes to ``" <i>"``, and encoding is unchanged (no merge makes them).

    Why: a random-weight model emits any id below its ``vocab_size`` (128,256 for Llama 3.1), and
    an id the tokenizer lacks decodes to nothing. SGLang's ``bench_serving`` client starts a
    request's clock at its first streamed chunk with text, so a request whose first tokens were
    such ids had its TTFT taken late and, with no text at all, was never timed (43% of requests
    on the H200, 2026-12-02). Padded, every token is text.
    """
    doc = json.loads(text)
    vocab = doc["model"]["vocab"]
    top = max(vocab.values()) + 1
    if vocab_size < top:
        raise ValueError(f"cannot pad a {top}-id vocabulary down to {vocab_size} ids")
    for i in range(top, vocab_size):
        entry = PAD_ENTRY.format(i)
        if entry in vocab:
            raise ValueError(f"the padding entry {entry!r} is already a token of this vocabulary")
        vocab[entry] = i
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


def load_tokenizer() -> "Tokenizer":
    """The shipped tokenizer (``assets/tokenizer.json``) as a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(asset_text(ASSET))


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> "Tokenizer":
    """A byte-level BPE trained on ``texts``; the same texts give the same tokenizer.

    Byte-level pre-tokenizer and decoder without a prefix space (text round-trips exactly), the
    256 byte symbols always in the vocabulary, ``<s>``/``</s>`` as ids 0/1 and ``<s>`` prepended
    when special tokens are added.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size {vocab_size} cannot hold the 256 byte symbols and {len(SPECIAL_TOKENS)} special tokens; "
            f"use at least {256 + len(SPECIAL_TOKENS)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok
