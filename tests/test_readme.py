"""The README's figures come from results files, stamped with the commit, never typed by hand (issue #14)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_table_in_the_readme_is_generated_from_the_results():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        common = _load(REPO / "benchmarks" / "common.py", "bench_common")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    text = common.README.read_text()
    start, end = text.index(common.TABLE_START) + len(common.TABLE_START), text.index(common.TABLE_END)
    assert text[start:end].strip() == common.results_table(common.load_results(common.RESULTS_DIR)).strip(), (
        "README bench table differs from benchmarks/results/*.json: run `make bench` (or its README step)")


def test_render_demo_states_scope_commit_and_metrics():
    figures = _load(REPO / "scripts" / "readme_figures.py", "readme_figures")
    doc = {"date": "2026-12-03T10:00:00Z", "git": "abc1234", "machine": {"cores": 2}, "smoke": False,
           "stages_s": {"setup": 130.0, "seeding": 28.0, "training": 175.0}, "total_s": 333.0,
           "structures": ["BODY", "GTV"], "held_out": {"dice_BODY": 0.9991, "dice_GTV": 0.8461, "hd95_GTV": 3.6},
           "qa_status": "PASS", "model": "models:/m@champion"}
    out = figures.render_demo(doc)
    assert "set-up included: **5 min 33 s** on 2 cores" in out
    assert "set-up 2 min 10 s" in out and "git abc1234" in out
    assert "| Dice | 0.999 | 0.846 |" in out and "| HD95 (mm) | — | 3.6 |" in out


def test_render_demo_shows_a_structure_never_found_as_a_dash():
    figures = _load(REPO / "scripts" / "readme_figures.py", "readme_figures")
    doc = {"stages_s": {"training": 3.0}, "total_s": 3.0, "structures": ["BODY", "GTV"],
           "held_out": {"dice_BODY": 0.79, "dice_GTV": None, "hd95_BODY": 54.8, "hd95_GTV": None}}
    out = figures.render_demo(doc)
    assert "| Dice | 0.790 | — |" in out and "| HD95 (mm) | 54.8 | — |" in out


def test_teams_section_commands_parse():
    """Every pacsai command line the README's "Teams and scale" section gives is one the CLI accepts (#17)."""
    import re
    import shlex

    from pacsai.cli import build_parser

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Teams and scale"):text.index("## Privacy defaults")]
    commands = [c for c in re.findall(r"`([^`]+)`", section) if re.search(r"(^pacsai |-m pacsai )", c)]
    assert len(commands) >= 4, commands
    verbs = set()
    for command in commands:
        argv = shlex.split(command.split("-m pacsai ", 1)[1] if "-m pacsai " in command else command[len("pacsai "):])
        args = build_parser(only=argv[0]).parse_args(argv)
        verbs.add(args.verb)
    assert {"train", "report", "export"} <= verbs


def test_demo_figures_in_the_readme_are_generated_from_the_demo_summary():
    """The README's demo paragraph and held-out table are the render of benchmarks/results/demo.json (a real
    `make demo` on a fresh clone, its set-up included), never typed by hand."""
    figures = _load(REPO / "scripts" / "readme_figures.py", "readme_figures")
    doc = json.loads(figures.DEMO_RESULT.read_text())
    assert doc.get("smoke") is False and "setup" in doc["stages_s"], "demo.json must come from a full `make demo`"
    text = figures.README.read_text()
    start, end = text.index(figures.START) + len(figures.START), text.index(figures.END)
    assert text[start:end].strip() == figures.render_demo(doc).strip(), (
        "README demo figures differ from benchmarks/results/demo.json: run "
        "`python scripts/readme_figures.py --demo reports/demo_summary.json` after `make demo`")
