"""Regenerate the README's demo figures from the demo's own summary, so no figure there is typed by hand.

Usage: ``python scripts/readme_figures.py [--demo reports/demo_summary.json]``

``make demo`` writes ``reports/demo_summary.json`` (stages, held-out metrics, QA status, commit). With ``--demo``
that file is first copied to ``benchmarks/results/demo.json`` (committed, beside the benchmark results); then the
text between ``<!-- demo:start -->`` and ``<!-- demo:end -->`` in README.md is rendered from it. The benchmark
table has its own markers and generator (``make bench``). ``tests/test_readme.py`` fails when either section no
longer matches its results file.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DEMO_RESULT = REPO / "benchmarks" / "results" / "demo.json"
START, END = "<!-- demo:start -->", "<!-- demo:end -->"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _value(value: float | None, digits: int) -> str:
    """A figure, or "—" where the demo measured none (null in the summary)."""
    return "—" if value is None else f"{value:.{digits}f}"


def render_demo(doc: Mapping[str, Any]) -> str:
    """The README's demo paragraph and held-out table from a demo summary."""
    stages = dict(doc.get("stages_s") or {})
    parts = ", ".join(f"{'set-up' if k == 'setup' else k} {_duration(v)}" for k, v in stages.items())
    scope = "set-up included" if "setup" in stages else "set-up not timed"
    cores = (doc.get("machine") or {}).get("cores", "?")
    lines = [
        f"`make demo` on a fresh clone, {scope}: **{_duration(float(doc.get('total_s') or 0))}** on {cores} cores "
        f"({parts}); QA gate of the demo report: {doc.get('qa_status', '?')}. Measured {str(doc.get('date'))[:10]} "
        f"at git {doc.get('git') or '?'}; generated from `benchmarks/results/demo.json` by "
        "`scripts/readme_figures.py`, not typed by hand.",
    ]
    held = dict(doc.get("held_out") or {})
    names = [n for n in doc.get("structures") or [] if f"dice_{n}" in held]
    if names:
        lines += [
            "",
            "Held-out patients of the demo's split (the validation notebook's figures):",
            "",
            "| | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
            "| Dice | " + " | ".join(_value(held[f"dice_{n}"], 3) for n in names) + " |",
        ]
        if any(f"hd95_{n}" in held for n in names):
            lines.append("| HD95 (mm) | " + " | ".join(
                _value(held.get(f"hd95_{n}"), 1) for n in names) + " |")
    return "\n".join(lines)


def section(text: str, start: str = START, end: str = END) -> tuple[int, int]:
    """Character span of the text between the markers; ValueError naming the fix when they are not there once."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i or text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"README.md needs exactly one {start} followed by one {end} around the demo figures")
    return i + len(start), j


def update(readme: Path = README, result: Path = DEMO_RESULT) -> bool:
    text = readme.read_text()
    i, j = section(text)
    new = text[:i] + "\n" + render_demo(json.loads(result.read_text())) + "\n" + text[j:]
    if new == text:
        return False
    tmp = readme.with_name(f".{readme.name}.demo.tmp")
    tmp.write_text(new)
    tmp.replace(readme)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--demo", type=Path,
                        help="a demo summary to adopt (default: keep benchmarks/results/demo.json)")
    args = parser.parse_args(argv)
    if args.demo:
        doc = json.loads(args.demo.read_text())
        if doc.get("smoke"):
            parser.error(f"{args.demo} is from `pacsai demo --smoke`: its figures are not the demo's")
        shutil.copyfile(args.demo, DEMO_RESULT)
    print("README demo figures", "regenerated" if update() else "unchanged", f"from {DEMO_RESULT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
