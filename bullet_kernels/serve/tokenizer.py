"""Text <-> token ids for the server, offline, and which tokenizer it is (said at start and in
``/health``).

In order: a model directory's ``tokenizer.json`` (Hugging Face ``tokenizers``); the project's
shipped byte-level BPE for presets that have a model directory form (``llama-3.1-8b``,
``qwen3-8b``: the same tokenizer the SGLang baseline is given); otherwise a byte-level fallback
(token id = byte value), for the tiny test presets whose 256-entry vocabulary is exactly bytes.

Chat: random-weight presets have no chat template, so ``/v1/chat/completions`` uses one minimal
template of our own (each message as ``<role>: <content>`` on its own line, then
``assistant:``). It is stated here because a template changes token counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..models.config import UnsupportedModelError
from .request import BadRequest

CHAT_ROLES = ("system", "user", "assistant")


class TextTokenizer:
    def __init__(self, hf_tokenizer=None, kind: str = "byte-level fallback"):
        self._tok, self.kind = hf_tokenizer, kind

    @classmethod
    def for_model(cls, spec: str, vocab_size: int) -> "TextTokenizer":
        """``spec``: a model directory or a preset name."""
        path = Path(spec)
        if path.is_dir() and (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return cls(Tokenizer.from_file(str(path / "tokenizer.json")), f"tokenizer.json of {path}")
        from ..models.presets import preset_tokenizer

        try:
            return cls(preset_tokenizer(spec), f"the shipped byte-level BPE of preset {spec}")
        except UnsupportedModelError:  # no shipped tokenizer for this preset
            if vocab_size < 256:
                raise ValueError(f"{spec}: no tokenizer.json and a vocabulary of {vocab_size} < 256 bytes") from None
            return cls(None, "byte-level fallback (token id = byte value)")

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise BadRequest(f"text must be a string, got {type(text).__name__}")
        if self._tok is None:
            return list(text.encode("utf-8"))
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        if self._tok is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, messages) -> str:
        """Our minimal chat template (module docstring); malformed messages are a BadRequest."""
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list of {role, content} objects")
        lines = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
                raise BadRequest(f"messages[{i}] must be {{\"role\": one of {list(CHAT_ROLES)}, \"content\": a string}}, "
                                 f"got {json.dumps(m)[:200]}")
            lines.append(f"{m['role']}: {m['content']}")
        return "\n".join(lines) + "\nassistant:"
