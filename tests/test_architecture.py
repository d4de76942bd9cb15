"""The architecture contracts of ``pyproject.toml`` (``[tool.importlinter]``) hold: layers cli -> jobs -> build ->
engine/recipes/data -> models | losses -> assign -> config -> ops | utils, and no import cycles at any depth.

A second run with a contract that the code breaks on purpose shows that the linter really reads the code."""

from __future__ import annotations

import pytest

pytest.importorskip("importlinter")
from importlinter.cli import lint_imports  # noqa: E402

from tests.conftest import ROOT  # noqa: E402


def test_pyproject_contracts_are_kept(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 kept, 0 broken" in out


def test_a_broken_contract_is_reported(monkeypatch, tmp_path, capsys):
    config = tmp_path / "contracts.toml"
    config.write_text('[tool.importlinter]\nroot_package = "e2edet"\n\n[[tool.importlinter.contracts]]\n'
                      'name = "models may not use ops (false on purpose)"\ntype = "forbidden"\n'
                      'source_modules = ["e2edet.models"]\nforbidden_modules = ["e2edet.ops"]\n')
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(config), no_cache=True, no_logo=True) == 1
    assert "0 kept, 1 broken" in capsys.readouterr().out
