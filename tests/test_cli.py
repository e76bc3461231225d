"""The ``pacsai`` command itself: one module per verb, a verb that cannot load fails loudly, a closed pipe ends
quietly for every verb, and the help texts name the model the demo really registers (issue #14)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pacsai import cli, commands
from pacsai.demo import default_experiment

COMMANDS_DIR = Path(commands.__file__).parent


def _verb_modules() -> set[str]:
    return {p.stem for p in COMMANDS_DIR.glob("*.py") if not p.stem.startswith("_")}


def test_every_verb_is_listed_in_help():
    out = subprocess.run([sys.executable, "-m", "pacsai", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for verb in cli.VERBS:
        assert verb in out.stdout


def test_every_module_in_commands_is_a_verb_of_its_own_name():
    """pacsai/commands/<verb>.py registers exactly the verb <verb>; every verb has its module there."""
    import argparse
    import importlib

    assert set(cli.VERBS) == _verb_modules() and len(cli.VERBS) >= 9
    for verb, module in cli.VERBS.items():
        assert module == f"pacsai.commands.{verb}"
        sub = argparse.ArgumentParser(prog="pacsai").add_subparsers()
        importlib.import_module(module).register(sub)
        assert list(sub.choices) == [verb], module
        assert callable(sub.choices[verb].get_default("func")) or verb == "pacs", module  # pacs: per sub-verb


def test_help_loads_no_heavy_package():
    """Verb modules import their domain modules inside ``func``: listing every verb stays fast."""
    heavy = ("torch", "monai", "mlflow", "papermill", "highdicom", "numpy", "pandas", "pydicom", "xarray", "scipy")
    script = ("import sys; from pacsai import cli; cli.build_parser(); "
              f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


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


# --- a closed pipe (`pacsai ... | head -1`) ends quietly with 141 for every verb, handled once in cli.main ---------


def _into_closed_pipe(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``pacsai ARGV`` with standard output a pipe whose reader is already gone: every write breaks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "pacsai", *argv], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=cwd, timeout=120, check=False)
    finally:
        os.close(write_end)


def test_watch_status_into_a_closed_pipe_is_quiet(tmp_path: Path):
    """Before: only the pacs verb caught BrokenPipeError; others ended in "internal error" with exit 3."""
    done = _into_closed_pipe(["watch", "--status", "--pacs", str(tmp_path / "pacs"),
                              "--state", str(tmp_path / "state.sqlite")], tmp_path)
    assert (done.returncode, done.stderr) == (141, "")


def test_help_into_a_closed_pipe_is_quiet(tmp_path: Path):
    # argparse drops a help text it cannot write (it ignores the OSError itself) and exits 0; either way, quietly
    done = _into_closed_pipe(["report", "--help"], tmp_path)
    assert done.returncode in (0, 141) and done.stderr == ""


def test_watch_status_piped_into_head_in_a_shell(tmp_path: Path):
    """The real thing: `pacsai watch --status | head -1` prints its first line, exits 0 or 141, says nothing more."""
    shell = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m pacsai watch --status --pacs {tmp_path / 'pacs'} "
         f"--state {tmp_path / 'state.sqlite'} | head -1; echo \"status ${{PIPESTATUS[0]}}\""],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False,
    )
    lines = shell.stdout.splitlines()
    assert lines[0].startswith("pacsai watch state ") and len(lines) == 2, shell.stdout
    assert lines[-1] in ("status 0", "status 141")  # 0 when it all fit in the pipe before head left
    assert shell.stderr == ""


# --- help texts and errors name the model the demo registers ----------------------------------------------------


def _demo_model_uri() -> str:
    return f"models:/{yaml.safe_load(default_experiment().read_text())['model']['name']}@champion"


def _help_texts(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    texts = {}
    pacs_subverbs = ("ping", "search", "pull", "push")
    for argv in [[verb] for verb in cli.VERBS] + [["pacs", sub] for sub in pacs_subverbs]:
        with pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        texts[" ".join(argv)] = capsys.readouterr().out
    return texts


def test_every_help_names_the_model_the_demo_registers(capsys):
    """Before: `pacsai report --help` suggested models:/demo-thorax@champion, a model nothing registers."""
    expected = _demo_model_uri()
    assert expected == "models:/pacsai-thorax@champion"
    named = {}
    for argv, text in _help_texts(capsys).items():
        assert text.startswith("usage: pacsai"), argv
        flat = " ".join(text.split())
        assert "demo-thorax" not in flat, argv
        # every concrete model URI (NAME, VERSION, ALIAS are placeholders) is the demo's
        for uri in re.findall(r"models:/[\w.-]+(?:@\w+|/\w+)?", flat):
            if not uri.startswith("models:/NAME"):
                named[argv] = uri
                assert uri == expected, (argv, uri)
    assert {"report", "watch"} <= set(named), named  # the verbs that take a model show an example


def test_report_without_model_names_the_demo_model(tmp_path: Path, capsys):
    code = cli.main(["report", "SYN-00000", "--structures-from", "model", "--pacs", str(tmp_path / "pacs")])
    err = capsys.readouterr().err
    assert code == 1 and "--model" in err
    assert _demo_model_uri() in err and "demo-thorax" not in err
