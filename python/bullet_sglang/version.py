"""The SGLang versions the adapter supports, checked before SGLang is imported."""

from __future__ import annotations

import importlib.metadata

SUPPORTED = ("0.5.15",)  # the release that pins torch 2.11, our GPU image's torch


class UnsupportedSGLang(RuntimeError):
    """SGLang is missing or of another version than the adapter's hooks were written against."""


def check_sglang_version(version: str | None = None) -> str:
    """The installed SGLang version, or UnsupportedSGLang saying what is installed and what is
    supported (``version`` overrides the lookup, for tests)."""
    if version is None:
        try:
            version = importlib.metadata.version("sglang")
        except importlib.metadata.PackageNotFoundError:
            raise UnsupportedSGLang(
                f"SGLang is not installed; bullet_sglang supports sglang {', '.join(SUPPORTED)} "
                "(pip install 'bullet_sglang[sglang]')"
            ) from None
    if version not in SUPPORTED:
        raise UnsupportedSGLang(
            f"sglang {version} is installed; bullet_sglang's hooks are written against sglang "
            f"{', '.join(SUPPORTED)} (SGLang's internals change between releases)"
        )
    return version
