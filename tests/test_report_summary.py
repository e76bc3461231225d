"""Small statements of the report summary (regressions from issue #14)."""

from __future__ import annotations

from pacsai.report.summary import _grid_note


def test_grid_note_names_where_the_structures_came_from():
    """Before: the note said "RTSTRUCT rasterised there" even when a model drew every contour."""
    assert "RTSTRUCT" not in _grid_note(True) and "model" in _grid_note(True)
    assert "RTSTRUCT" in _grid_note(False) and "model" not in _grid_note(False)
