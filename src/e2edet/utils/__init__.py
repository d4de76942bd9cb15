"""e2edet.utils."""

from __future__ import annotations


def error_text(exc: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed), or its type name when it has none.

    Used to quote a library's reason inside the project's own one-line messages, e.g.
    ``f"{file} is not a readable safetensors weights file: {error_text(err)}"``.
    """
    return " ".join(str(exc).split()) or type(exc).__name__


def shutdown_workers(loader: object) -> None:
    """End the persistent worker processes of ``loader`` (a ``DataLoader`` built with ``persistent_workers``), if
    any are running; anything else is left alone.

    Persistent workers otherwise live until the interpreter exits, where ``multiprocessing`` terminates them and the
    loader's SIGCHLD handler reports "DataLoader worker ... is killed by signal: Terminated". PyTorch has no public
    call for this; the loader's own iterator method that its destructor uses is called instead.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None  # type: ignore[attr-defined]
