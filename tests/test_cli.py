"""The ``pacsai`` command itself: every verb loads, and a verb that cannot load fails loudly (issue #14)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pacsai import cli


def test_every_verb_is_listed_in_help():
    out = subprocess.run([sys.executable, "-m", "pacsai", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for verb in cli.VERBS:
        assert verb in out.stdout


def test_a_verb_that_cannot_be_imported_fails_loudly(monkeypatch, capsys):
    """Before: a verb whose module raised ModuleNotFoundError vanished from --help as "not built yet"."""
    monkeypatch.setitem(cli.VERBS, "broken", "pacsai.no_such_module_for_the_test")
    code = cli.main(["broken", "--help"])
    err = capsys.readouterr().err
    assert code == 3
    assert "pacsai.no_such_module_for_the_test" in err and "make setup" in err


def test_other_verbs_still_run_when_one_is_broken(monkeypatch, capsys):
    """Only the asked verb is imported, so a broken extra (e.g. the viewer's) does not block `pacsai report`."""
    monkeypatch.setitem(cli.VERBS, "broken", "pacsai.no_such_module_for_the_test")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", "--help"])
    assert exit_.value.code == 0
    assert "--structures-from" in capsys.readouterr().out
