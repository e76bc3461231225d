"""notebooks/01_explore_pacs: paired, committed clean, and executed end to end by papermill (smoke parameters)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jupytext
import nbformat

from tests import headless

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


def test_executes_with_smoke_parameters_and_exports_offline(tmp_path, monkeypatch):
    import papermill as pm
    from nbconvert import HTMLExporter

    from pacsai.pacs import connect
    from pacsai.synthetic import make_patient, seed_pacs
    from tests.test_structure_sets import REVISION_ROIS, revision

    monkeypatch.delenv("PACSAI_VIEWER", raising=False)
    url = f"file://{tmp_path / 'pacs'}"
    # The smallest thorax the phantom allows (384 × 384 × 120 mm), one patient, no prior: a few seconds.
    seed_pacs(connect(url), patients=1, seed=21, shape=(40, 96, 96), spacing=(4.0, 4.0, 3.0), with_prior=False,
              progress=False)
    # A planner's later revision of the structure set with fewer ROIs: the library's rule (which the report uses
    # too) takes it, where "most ROIs" would not.
    patient = make_patient(21, shape=(40, 96, 96), spacing=(4.0, 4.0, 3.0), with_prior=False)
    assert connect(url).store([revision(patient)], progress=False).ok
    out = tmp_path / "01_explore_pacs.ipynb"
    start = time.perf_counter()
    # papermill's defaults, as a user would run it (nbclient stores widget state by default)
    pm.execute_notebook(str(NOTEBOOK), str(out), parameters={"pacs_url": url, "smoke": True}, kernel_name="pacsai",
                        progress_bar=False, cwd=str(tmp_path))
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"notebook took {elapsed:.0f} s"

    # No widget built, no state stored: the volumes would otherwise be stored in the notebook (7 MB here).
    assert out.stat().st_size < 1_000_000
    nb = nbformat.read(out, as_version=4)
    assert "widgets" not in nb.metadata
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "SYN-00021: CT (40, 96, 96) voxels of (4.0, 4.0, 3.0) mm" in text
    assert "dose max" in text and "1 series of 1 patients" in text
    assert "structures: RTSTRUCT 'Physician revision' (20300101), 2 in the study" in text
    assert f"structures {list(REVISION_ROIS)}" in text
    dvh_table = [o for o in outputs if "text/html" in o.get("data", {}) and "d0_03cc_gy" in o.data["text/html"]]
    assert len(dvh_table) == 1 and ">GTV<" in dvh_table[0].data["text/html"]
    assert not [o for o in outputs if WIDGET_VIEW in o.get("data", {})]
    viewer = [o for o in outputs if "pacsai viewer (static)" in o.get("data", {}).get("text/plain", "")]
    assert len(viewer) == 1 and "image/png" in viewer[0].data
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 4  # viewer, HU histograms, dose planes, DVH

    # The HTML export, opened in Chromium with the network cut: every picture is there, with its size.
    html, _ = HTMLExporter().from_notebook_node(nb)
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) == 4
    assert "widget-state+json" not in html
    probe = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-images', "
             "JSON.stringify([...document.images].map(i => [i.naturalWidth, i.naturalHeight, "
             "Math.round(i.getBoundingClientRect().width), Math.round(i.getBoundingClientRect().height)]))));"
             "</script>")
    page = tmp_path / "01_explore_pacs.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    dom = headless.dump_dom(page.as_uri())
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, "the page did not load"
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(images) == 4 and all(min(size) > 100 for size in images), images

    # A screenshot of the viewer's picture as a reader of the export sees it (offline).
    shot = headless.screenshot(page.as_uri(), headless.shots_dir(tmp_path) / "explore_export.png", size=(1300, 4200))
    assert _viewer_picture_inked(shot) > 0.05


def _viewer_picture_inked(png: Path) -> float:
    """Share of non-white pixels in the screenshot: the three planes are dark CT on a white page."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.int16)
    return float((pixels < 128).mean())
