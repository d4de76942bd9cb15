"""e2edet.utils.io: atomic whole-file writes."""

from __future__ import annotations

import json
import os

import pytest

from e2edet.utils.io import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_text_writes_content_and_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write_text(path, "héllo\nworld\n") == path
    assert path.read_text(encoding="utf-8") == "héllo\nworld\n"
    assert _names(path.parent) == ["out.txt"]  # no temporary file left
    atomic_write_text(str(path), "second")  # str paths work; an existing file is replaced
    assert path.read_text(encoding="utf-8") == "second"
    assert _names(path.parent) == ["out.txt"]


def test_atomic_write_json_passes_json_kwargs(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"b": [1, 2], "a": object()}, indent=2, default=lambda v: "obj")
    assert path.read_text(encoding="utf-8") == json.dumps({"b": [1, 2], "a": "obj"}, indent=2)
    assert _names(tmp_path) == ["out.json"]


def test_atomic_write_bytes(tmp_path):
    path = tmp_path / "w.bin"
    atomic_write_bytes(path, b"\x00\x01\n\xff")
    assert path.read_bytes() == b"\x00\x01\n\xff"
    assert _names(tmp_path) == ["w.bin"]


def test_failure_while_writing_keeps_old_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"old": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"new": object()})  # not JSON-encodable: fails half-way through the dump
    assert json.loads(path.read_text()) == {"old": 1}
    assert _names(tmp_path) == ["out.json"]  # the temporary file was removed
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert json.loads(path.read_text()) == {"old": 1}
    assert _names(tmp_path) == ["out.json"]


def test_failure_while_writing_a_new_file_leaves_nothing(tmp_path):
    path = tmp_path / "new.txt"
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert _names(tmp_path) == []


def test_temporary_file_is_a_hidden_sibling(tmp_path):
    path = tmp_path / "out.txt"
    with atomic_open(path, "w") as f:
        f.write("x")
        tmp_names = [n for n in _names(tmp_path)]
        assert not path.exists()  # nothing at the target until the block ends
    assert len(tmp_names) == 1 and tmp_names[0].startswith(".out.txt.") and tmp_names[0].endswith(".tmp")
    assert path.read_text() == "x"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_rejects_other_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):
            pass
    assert _names(tmp_path) == []
