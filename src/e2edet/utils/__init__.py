"""e2edet.utils."""

from __future__ import annotations


def error_text(exc: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed), or its type name when it has none.

    Used to quote a library's reason inside the project's own one-line messages, e.g.
    ``f"{file} is not a readable safetensors weights file: {error_text(err)}"``.
    """
    return " ".join(str(exc).split()) or type(exc).__name__
