"""The shipped byte-level BPE tokenizer, the llama-3.1-8b model directory, and how both are made."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from bullet_kernels.models import ModelConfig, UnsupportedModelError, preset_config
from bullet_kernels.models.presets import (
    PRESETS_WITH_MODEL_DIR,
    preset_tokenizer,
    shipped_config,
    write_model_dir,
)
from bullet_kernels.models.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, load_tokenizer, train_byte_level_bpe

REPO = Path(__file__).resolve().parent.parent
TEXTS = [
    "def forward(self, batch):\n    return self.model(batch)\n",
    "Prefill is compute-bound; decode is bound by HBM bandwidth.",
    "  tabs\tand\r\nnewlines\n\n  and trailing spaces   ",
    "héllo wörld, 東京, emoji 🚀, math ∑ x² ≤ ∞",
    "".join(map(chr, range(1, 256))),  # every Latin-1 code point, control characters included
]


def test_shipped_tokenizer_is_found_as_package_data():
    tok = load_tokenizer()
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1]


def test_llama_preset_tokenizer_fits_the_preset():
    config = preset_config("llama-3.1-8b")
    tok = preset_tokenizer("llama-3.1-8b")
    assert tok.get_vocab_size() <= config.vocab_size
    assert tok.token_to_id("<s>") == config.bos_token_id
    assert tok.token_to_id("</s>") in config.eos_token_ids
    ids = [i for t in TEXTS for i in tok.encode(t).ids]
    assert max(ids) < config.vocab_size and min(ids) >= 0
    assert tok.get_vocab_size() == config.vocab_size and tok.decode([config.vocab_size - 1]) == f" <{config.vocab_size - 1}>"


@pytest.mark.parametrize("text", TEXTS)
def test_any_text_round_trips_exactly(text):
    tok = load_tokenizer()
    enc = tok.encode(text)
    assert enc.ids[0] == 0, "encoding with special tokens starts with <s>, as Llama 3 tokenizers do"
    assert tok.decode(enc.ids, skip_special_tokens=True) == text
    plain = tok.encode(text, add_special_tokens=False).ids
    assert plain == enc.ids[1:]
    assert tok.get_vocab_size() > max(plain)


def test_trained_merges_compress_code_and_prose():
    tok = load_tokenizer()
    # What the corpus is full of must come out in few tokens: merges happened, bytes are rare.
    assert len(tok.encode("    return self", add_special_tokens=False).ids) <= 3
    text = TEXTS[0] + TEXTS[1]
    assert len(tok.encode(text, add_special_tokens=False).ids) < 0.4 * len(text.encode())


def test_training_is_deterministic_and_refuses_a_vocab_without_room_for_bytes():
    corpus = TEXTS * 20
    a = train_byte_level_bpe(corpus, vocab_size=300).to_str()
    b = train_byte_level_bpe(corpus, vocab_size=300).to_str()
    assert a == b
    assert json.loads(a)["model"]["vocab"]["<s>"] == 0
    with pytest.raises(ValueError, match="at least 258"):
        train_byte_level_bpe(corpus, vocab_size=257)


def test_committed_tokenizer_is_what_the_training_script_makes():
    spec = importlib.util.spec_from_file_location("train_tokenizer", REPO / "scripts" / "train_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    has_commit = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{script.CORPUS_COMMIT}^{{commit}}"], capture_output=True
    )
    if has_commit.returncode != 0:
        pytest.skip(f"the corpus commit {script.CORPUS_COMMIT[:12]} is not in this clone (shallow clone?)")
    assert script.ASSET.read_text(encoding="utf-8") == script.trained_json()


def test_write_model_dir_makes_a_complete_hf_directory(tmp_path):
    out = write_model_dir("llama-3.1-8b", tmp_path / "new" / "llama")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    ]
    assert ModelConfig.from_hf(out) == preset_config("llama-3.1-8b")
    assert json.loads((out / "config.json").read_text()) == shipped_config("llama-3.1-8b")
    write_model_dir("llama-3.1-8b", out)  # again: overwrites in place


def test_the_model_dirs_tokenizer_decodes_every_id_the_model_can_emit(tmp_path):
    """Padded to the model's vocabulary: ids past ours decode to " <id>" (SGLang's benchmark
    client times a request from its first chunk with text), encoding and our ids' text unchanged."""
    from tokenizers import Tokenizer

    out = write_model_dir("llama-3.1-8b", tmp_path)
    padded, ours = Tokenizer.from_file(str(out / "tokenizer.json")), load_tokenizer()
    assert padded.get_vocab_size() == preset_config("llama-3.1-8b").vocab_size == 128256
    for text in TEXTS + [" <4096>", "Ġ<4096>"]:
        assert padded.encode(text).ids == ours.encode(text).ids
    assert padded.decode(list(range(2, VOCAB_SIZE))) == ours.decode(list(range(2, VOCAB_SIZE)))
    assert padded.decode([VOCAB_SIZE, 77777, 128255]) == f" <{VOCAB_SIZE}> <77777> <128255>"
    assert all(padded.decode([i]) for i in range(VOCAB_SIZE, 128256, 997))
    trained = write_model_dir("llama-3.1-8b", tmp_path / "client", pad_vocab=False)  # a benchmark client's
    assert (trained / "tokenizer.json").read_text() == (REPO / "bullet_kernels/models/assets/tokenizer.json").read_text()


def test_padding_a_vocabulary_refuses_what_it_cannot_do():
    from bullet_kernels.models.tokenizer import ASSET, PAD_ENTRY, asset_text, padded_json

    text = asset_text(ASSET)
    assert padded_json(text, VOCAB_SIZE) == json.dumps(json.loads(text), ensure_ascii=False, indent=2) + "\n"
    with pytest.raises(ValueError, match=f"cannot pad a {VOCAB_SIZE}-id vocabulary down to 100 ids"):
        padded_json(text, 100)
    doc = json.loads(text)
    doc["model"]["vocab"][PAD_ENTRY.format(VOCAB_SIZE + 1)] = 7  # a (made-up) token spelled like a pad entry
    with pytest.raises(ValueError, match="already a token"):
        padded_json(json.dumps(doc), VOCAB_SIZE + 2)


def test_transformers_reads_the_model_dir_like_we_do(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = write_model_dir("llama-3.1-8b", tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer()
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == ours.encode(text).ids
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "user: hi\nassistant: "
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert (hf_config.num_hidden_layers, hf_config.vocab_size) == (32, 128256)


def test_presets_without_a_model_dir_are_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedModelError) as e:
        write_model_dir("tiny-llama3", tmp_path)
    assert "tiny-llama3" in str(e.value) and all(n in str(e.value) for n in PRESETS_WITH_MODEL_DIR)
    with pytest.raises(UnsupportedModelError, match="qwen3-8b"):
        preset_tokenizer("qwen3-8b")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        write_model_dir("llama-3.1-8b", tmp_path / "file")
