"""Command-line niceties: --version, aliases in `train --help`, recipe-name suggestions, one-line warnings."""

from __future__ import annotations

import warnings

import pytest

from e2edet import __version__
from e2edet.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"e2edet {__version__}"


def test_train_help_lists_the_aliases(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "data= (data.dataset)" in out and "iters= (train.max_iters)" in out and "output= (output_dir)" in out


@pytest.mark.parametrize("name, hint", [
    ("defcn_mnv2", "did you mean defcn_mnv2_cpu"),
    ("ms_detr_refin_mnv2_cpu", "did you mean ms_detr_refine_mnv2_cpu"),
    ("zzz", "a recipe name or a config .yaml file"),
])
def test_mistyped_recipe_gets_a_suggestion(name, hint, capsys):
    assert main(["recipes", "show", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unknown recipe '{name}'" in err and hint in err
    assert "`e2edet recipes` lists all" in err


def test_warnings_print_one_line_without_source(monkeypatch):
    import e2edet.cli as cli

    seen = []

    def command(args):
        seen.append(warnings.formatwarning("something odd\n  in two lines", UserWarning, "/x/y.py", 3, "src line"))
        return 0

    original = warnings.formatwarning
    monkeypatch.setattr(cli, "_cmd_recipes", command)
    assert main(["recipes"]) == 0
    assert seen == ["e2edet: warning: something odd in two lines\n"]  # no file, line number or source line
    assert warnings.formatwarning is original  # restored after the command
    monkeypatch.setenv("E2EDET_DEBUG", "1")
    assert main(["recipes"]) == 0 and seen[1].startswith("/x/y.py:3: UserWarning")  # debug: Python's format
