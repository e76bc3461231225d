"""notebooks/01_explore_pacs: paired, committed clean, and executed end to end by papermill (smoke parameters)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jupytext
import nbformat

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "01_explore_pacs.ipynb"
PAIRED = NOTEBOOK.with_suffix(".py")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _code(nb: nbformat.NotebookNode) -> list[str]:
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


def test_committed_without_outputs_on_the_pacsai_kernel():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "pacsai"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert 'pacs_url: str = ""' in tagged[0].source and "smoke: bool = False" in tagged[0].source
    assert "widgets" not in nb.metadata


def test_py_percent_pair_matches():
    assert _code(jupytext.read(PAIRED)) == _code(nbformat.read(NOTEBOOK, as_version=4))


def test_executes_with_smoke_parameters(tmp_path, monkeypatch):
    import papermill as pm
    from nbconvert import HTMLExporter

    from pacsai.pacs import connect
    from pacsai.synthetic import seed_pacs

    monkeypatch.delenv("PACSAI_VIEWER", raising=False)
    url = f"file://{tmp_path / 'pacs'}"
    # The smallest thorax the phantom allows (384 × 384 × 120 mm), one patient, no prior: a few seconds.
    seed_pacs(connect(url), patients=1, seed=21, shape=(40, 96, 96), spacing=(4.0, 4.0, 3.0), with_prior=False,
              progress=False)
    out = tmp_path / "01_explore_pacs.ipynb"
    start = time.perf_counter()
    pm.execute_notebook(
        str(NOTEBOOK), str(out), parameters={"pacs_url": url, "smoke": True}, kernel_name="pacsai",
        store_widget_state=False, progress_bar=False, cwd=str(tmp_path),
    )
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"notebook took {elapsed:.0f} s"

    # No widget state: the volumes would otherwise be stored in the notebook (hundreds of MB for a real CT).
    assert out.stat().st_size < 1_000_000
    nb = nbformat.read(out, as_version=4)
    assert "widgets" not in nb.metadata
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "SYN-00021: CT (40, 96, 96) voxels of (4.0, 4.0, 3.0) mm" in text
    assert "dose max" in text and "1 series of 1 patients" in text
    dvh_table = [o for o in outputs if "text/html" in o.get("data", {}) and "d0_03cc_gy" in o.data["text/html"]]
    assert len(dvh_table) == 1 and ">GTV<" in dvh_table[0].data["text/html"]
    viewer = [o for o in outputs if WIDGET_VIEW in o.get("data", {})]
    assert len(viewer) == 1 and "image/png" in viewer[0].data  # the widget, and its picture for exports
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 4  # viewer, HU histograms, dose planes, DVH

    # nbconvert HTML skips widget views without stored state: the viewer must show up as its PNG there.
    html, _ = HTMLExporter().from_notebook_node(nb)
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) == 4
    mid = json.dumps(viewer[0].data[WIDGET_VIEW]["model_id"])
    assert mid not in html, html[html.find(mid) - 400:html.find(mid) + 100]
