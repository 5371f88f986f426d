#!/usr/bin/env python3
"""Train the shipped tokenizer (bullet_kernels/models/assets/tokenizer.json) again, or check it.

The corpus is this repository's own Python sources and Markdown docs at a pinned commit, read
from git, so the input never changes and the same ``tokenizers`` version writes the same file:

    python3 scripts/train_tokenizer.py            # write the asset
    python3 scripts/train_tokenizer.py --check    # exit 1 if the committed asset differs

Needs the pinned commit in the clone's history (a shallow clone does not have it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bullet_kernels.models.tokenizer import VOCAB_SIZE, train_byte_level_bpe

REPO = Path(__file__).resolve().parent.parent
CORPUS_COMMIT = "fa48be48f22421b6696f9a7c690ea158234a8dff"  # the tree the shipped asset was trained on
CORPUS_SUFFIXES = (".py", ".md")
ASSET = REPO / "bullet_kernels" / "models" / "assets" / "tokenizer.json"


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"train_tokenizer: git {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def corpus(commit: str = CORPUS_COMMIT) -> list[str]:
    """Every .py and .md file of ``commit``, in path order."""
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    if found.returncode:
        raise SystemExit(f"train_tokenizer: commit {commit} is not in this clone (shallow?); fetch the full history")
    paths = sorted(p for p in _git("ls-tree", "-r", "--name-only", commit).splitlines() if p.endswith(CORPUS_SUFFIXES))
    return [_git("show", f"{commit}:{p}") for p in paths]


def trained_json(commit: str = CORPUS_COMMIT, vocab_size: int = VOCAB_SIZE) -> str:
    return train_byte_level_bpe(corpus(commit), vocab_size).to_str(pretty=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the committed asset instead of writing it")
    args = p.parse_args(argv)
    text = trained_json()
    if args.check:
        same = ASSET.is_file() and ASSET.read_text(encoding="utf-8") == text
        print(f"{ASSET.relative_to(REPO)}: {'matches' if same else 'DIFFERS from'} a fresh training run")
        return 0 if same else 1
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    ASSET.write_text(text, encoding="utf-8")
    print(f"wrote {ASSET.relative_to(REPO)} ({len(text) // 1024} KiB, vocab {VOCAB_SIZE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
