from __future__ import annotations

import base64
import gzip
import io
import os

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import AxesImage

from pacsai import viz
from pacsai.errors import PacsaiError, PacsaiWarning, VolumeError
from pacsai.imaging.geometry import affine_from, like, make_volume

# A cube of 5 × 5 × 5 voxels (2 mm) centred on this LPS point, a voxel centre in every grid below.
CUBE_MM = np.array([29.0, -19.0, 9.0])
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _grid(direction: np.ndarray, *, shape: tuple[int, int, int] = (40, 50, 60), spacing=(2.0, 2.0, 2.0)):
    """A CT-like volume (air, a body block at 0 HU, a bone cube at 1000 HU) plus BODY and GTV masks.

    ``direction`` may flip or permute the grid axes; the anatomy sits at the same patient position regardless.
    """
    direction = np.asarray(direction, dtype=float)
    nz, ny, nx = shape
    size_ijk = np.array([nx, ny, nz], dtype=float)
    # Put the grid so that its centre is the patient origin.
    centre_offset = direction @ (np.asarray(spacing) * (size_ijk - 1) / 2)
    affine = affine_from(-centre_offset, direction, spacing)
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    xyz = (ijk @ affine.T)[..., :3]
    gtv = np.all(np.abs(xyz - CUBE_MM) <= 4.5, axis=-1)
    body = np.all(np.abs(xyz) <= [50.0, 40.0, 1000.0], axis=-1)
    hu = np.where(body, 0.0, -1000.0)
    hu[gtv] = 1000.0
    image = make_volume(hu.astype(np.float32), affine, name="CT", attrs={"frame_of_reference_uid": "1.2.3"})
    masks = {"BODY": like(image, body), "GTV": like(image, gtv)}
    return image, masks


IDENTITY = np.eye(3)
FLIPPED = np.diag([-1.0, 1.0, -1.0])
PERMUTED = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # i→y, j→x, k→−z


def _contour_centre(ax, gid: str) -> np.ndarray:
    coll = next(c for c in ax.collections if c.get_gid() == gid)
    vertices = np.concatenate([p.vertices for p in coll.get_paths()])
    return (vertices.min(axis=0) + vertices.max(axis=0)) / 2


def _bright_centre(ax) -> np.ndarray:
    """Centre (mm, axes units) of the 1000 HU pixels of the grey image drawn in ``ax``."""
    image = next(im for im in ax.images if isinstance(im, AxesImage) and im.get_gid() is None)
    data = np.asarray(image.get_array())
    left, right, bottom, top = image.get_extent()
    rows, cols = np.nonzero(data > 500)
    dh, dv = (right - left) / data.shape[1], (top - bottom) / data.shape[0]
    return np.array([left + (cols.mean() + 0.5) * dh, bottom + (rows.mean() + 0.5) * dv])


@pytest.mark.parametrize("direction", [IDENTITY, FLIPPED, PERMUTED], ids=["identity", "flipped", "permuted"])
def test_planes_put_anatomy_at_its_patient_position(direction):
    image, masks = _grid(direction)
    fig = viz.plot_planes(image, masks)  # default centre: the GTV centroid
    axial, coronal, sagittal = fig.axes[:3]
    x, y, z = CUBE_MM
    for ax, expected in ((axial, (x, y)), (coronal, (x, z)), (sagittal, (y, z))):
        np.testing.assert_allclose(_contour_centre(ax, "structure:GTV"), expected, atol=1e-6)
        np.testing.assert_allclose(_bright_centre(ax), expected, atol=1e-6)
    assert axial.get_title() == f"Axial  z = {z:.1f} mm"
    assert coronal.get_title() == f"Coronal  y = {y:.1f} mm"
    assert sagittal.get_title() == f"Sagittal  x = {x:.1f} mm"
    # Radiological convention: anterior (small y) up in the axial view, superior up elsewhere, R on the left.
    assert axial.get_ylim()[0] > axial.get_ylim()[1]
    assert coronal.get_ylim()[0] < coronal.get_ylim()[1]
    assert sagittal.get_ylim()[0] < sagittal.get_ylim()[1]
    assert all(ax.get_xlim()[0] < ax.get_xlim()[1] for ax in (axial, coronal, sagittal))


def test_every_structure_is_contoured_in_its_colour_and_listed():
    image, masks = _grid(IDENTITY)
    fig = viz.plot_planes(image, masks, center=CUBE_MM)
    for ax in fig.axes[:3]:
        gids = [c.get_gid() for c in ax.collections]
        assert gids == ["structure:BODY", "structure:GTV"]
        gtv = next(c for c in ax.collections if c.get_gid() == "structure:GTV")
        np.testing.assert_allclose(gtv.get_edgecolor()[0][:3], viz.structure_color("GTV"))
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["BODY", "GTV"]


def test_center_defaults_to_volume_centre_without_gtv_and_refuses_points_outside():
    image, masks = _grid(IDENTITY)
    fig = viz.plot_planes(image, {"BODY": masks["BODY"]})
    # 60 × 50 × 40 voxels of 2 mm centred on 0: the middle voxel (rounded) is at +1 mm on each axis.
    assert fig.axes[0].get_title() == "Axial  z = 1.0 mm"
    with pytest.raises(VolumeError, match=r"outside the image"):
        viz.plot_planes(image, masks, center=(0.0, 0.0, 500.0))
    with pytest.raises(PacsaiError, match="empty structure"):
        viz.plot_planes(image, masks, center=like(image, np.zeros(image.shape, dtype=bool)))


def test_structures_and_dose_on_other_grids_are_resampled_not_misplaced():
    image, _ = _grid(IDENTITY)
    coarse, coarse_masks = _grid(IDENTITY, shape=(20, 25, 30), spacing=(4.0, 4.0, 4.0))
    # Dose: 60 Gy at the cube on the coarse grid, falling off linearly with distance.
    affine = coarse.attrs["affine"]
    k, j, i = np.meshgrid(*(np.arange(n) for n in coarse.shape), indexing="ij")
    xyz = (np.stack([i, j, k, np.ones_like(i)], -1).astype(float) @ affine.T)[..., :3]
    dose = like(coarse, np.clip(60.0 - np.linalg.norm(xyz - CUBE_MM, axis=-1), 0, None))
    fig = viz.plot_planes(image, {"GTV": coarse_masks["GTV"]}, dose, prescription_gy=60.0)
    axial = fig.axes[0]
    gids = [c.get_gid() for c in axial.collections]
    assert gids[:4] == ["isodose:57.00", "isodose:48.00", "isodose:30.00", "isodose:18.00"]
    assert "structure:GTV" in gids
    np.testing.assert_allclose(_contour_centre(axial, "isodose:30.00"), CUBE_MM[:2], atol=1.0)
    np.testing.assert_allclose(_contour_centre(axial, "structure:GTV"), CUBE_MM[:2], atol=2.0)
    assert [im.get_gid() for im in axial.images] == [None, "dose-wash"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["GTV", "64.2 Gy (107% Rx)", "57.0 Gy (95% Rx)", "48.0 Gy (80% Rx)", "30.0 Gy (50% Rx)",
                      "18.0 Gy (30% Rx)"]
    rx95 = next(c for c in axial.collections if c.get_gid() == "isodose:57.00")
    np.testing.assert_allclose(rx95.get_edgecolor()[0][:3], [1.0, 32 / 255, 32 / 255])
    # Without a prescription the levels are percentages of the maximum, none above 100 %: the same dose on the
    # image grid, where the cube centre is a voxel centre, peaks at exactly 60 Gy.
    k, j, i = np.meshgrid(*(np.arange(n) for n in image.shape), indexing="ij")
    xyz = (np.stack([i, j, k, np.ones_like(i)], -1).astype(float) @ image.attrs["affine"].T)[..., :3]
    fig = viz.plot_planes(image, None, like(image, np.clip(60.0 - np.linalg.norm(xyz - CUBE_MM, axis=-1), 0, None)))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "57.0 Gy (95% max)", "48.0 Gy (80% max)", "30.0 Gy (50% max)", "18.0 Gy (30% max)"]


def test_overlay_on_another_frame_of_reference_is_refused():
    image, _ = _grid(IDENTITY)
    other = make_volume(np.ones((4, 4, 4), bool), np.eye(4), attrs={"frame_of_reference_uid": "9.9"})
    with pytest.raises(VolumeError, match="frame of reference 9.9"):
        viz.plot_planes(image, {"GTV": other})


def test_structure_colours_are_fixed_per_name():
    assert viz.structure_color("Lung_L") == viz.structure_color("lung-l") == (0.0, 0.78, 1.0)
    assert viz.structure_color("GTV") == (1.0, 0.0, 0.0)
    odd = viz.structure_color("Brachial plexus")
    assert odd == viz.structure_color("BRACHIAL_PLEXUS")
    assert len(odd) == 3 and all(0.0 <= c <= 1.0 for c in odd)


def test_plot_dvh_draws_one_line_per_structure():
    class Curve:
        def curve(self):
            return np.array([0.0, 30.0, 60.0]), np.array([100.0, 50.0, 0.0])

    dvhs = {"PTV": (np.array([0.0, 57.0, 62.0]), np.array([100.0, 100.0, 0.0])), "Heart": Curve()}
    fig = viz.plot_dvh(dvhs, prescription_gy=60.0)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"PTV", "Heart", "prescription 60 Gy"}
    np.testing.assert_array_equal(lines["Heart"].get_xdata(), [0.0, 30.0, 60.0])
    np.testing.assert_allclose(lines["PTV"].get_color(), viz.structure_color("PTV"))
    assert ax.get_xlabel() == "Dose (Gy)" and ax.get_ylabel() == "Volume (%)"
    with pytest.raises(PacsaiError, match="'Cord'"):
        viz.plot_dvh({"Cord": (np.zeros(3), np.zeros(4))})


def test_plot_histograms_one_step_per_nonempty_structure():
    image, masks = _grid(IDENTITY)
    masks["Empty"] = like(image, np.zeros(image.shape, bool))
    fig = viz.plot_histograms(image, masks, bins=20, value_range=(-1100.0, 1100.0))
    labels = [p.get_label() for p in fig.axes[0].patches]
    assert labels == ["BODY (median 0)", "GTV (median 1000)"]


def test_nifti_bytes_keep_every_voxel_at_its_patient_position():
    image, _ = _grid(PERMUTED, shape=(6, 7, 8))
    data = viz.to_nifti_bytes(image)
    assert data[:2] == b"\x1f\x8b"  # gzip
    nii = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    arr = np.asarray(nii.dataobj)
    assert arr.shape == (8, 7, 6)
    k, j, i = 5, 2, 3
    assert arr[i, j, k] == image.values[k, j, i]
    ras = nii.affine @ [i, j, k, 1]
    lps = image.attrs["affine"] @ [i, j, k, 1]
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]])
    assert int(nii.header["sform_code"]) == 1 and int(nii.header["qform_code"]) == 1


def test_view_outside_a_kernel_is_a_static_picture():
    image, masks = _grid(IDENTITY)
    viewer = viz.view(image, structures=masks)
    assert viewer.backend == "static" and viewer.widget is None
    bundle = viewer._repr_mimebundle_()
    assert set(bundle) == {"image/png", "text/plain"}
    assert base64.b64decode(bundle["image/png"])[:8] == PNG_MAGIC


def test_view_niivue_carries_widget_and_png(monkeypatch):
    pytest.importorskip("ipyniivue")
    image, masks = _grid(IDENTITY)
    viewer = viz.view(image, structures=masks, dose=like(image, np.ones(image.shape, np.float32)), backend="niivue")
    bundle = viewer._repr_mimebundle_()
    assert set(bundle) == {"image/png", "text/plain", "application/vnd.jupyter.widget-view+json"}
    # what is shown: the viewer with its legend (structure swatches, the dose overlay's colour scale) below it
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == viewer.displayed.model_id
    assert viewer.displayed.children == (viewer.widget, viewer.legend)
    assert ">GTV</span>" in viewer.legend.value and ">BODY</span>" not in viewer.legend.value  # BODY: no overlay
    assert "0.1 Gy" in viewer.legend.value and "1.0 Gy" in viewer.legend.value  # cal_min .. cal_max of the dose
    assert (viewer.widget.volumes[2].cal_min, viewer.widget.volumes[2].cal_max) == (pytest.approx(0.1), 1.0)
    names = [v.name for v in viewer.widget.volumes]
    assert names == ["image.nii.gz", "structures.nii.gz", "dose.nii.gz"]
    label = nib.Nifti1Image.from_bytes(gzip.decompress(viewer.widget.volumes[1].data))
    # BODY stays out of the label overlay (it would cover the image); the GTV is label 1, where the mask is.
    np.testing.assert_array_equal(np.asarray(label.dataobj).transpose(2, 1, 0), masks["GTV"].values.astype(np.uint8))
    assert viewer.widget.volumes[1].colormap_label.labels == ["background", "GTV"]
    assert viewer.widget.opts.is_radiological_convention
    viewer.displayed.close()
    viewer.legend.close()
    viewer.widget.close()


def test_view_matplotlib_fallback_and_env_override(monkeypatch):
    image, masks = _grid(IDENTITY)
    monkeypatch.setenv("PACSAI_VIEWER", "matplotlib")
    viewer = viz.view(image, structures=masks)
    assert viewer.backend == "matplotlib"
    sliders = viewer.widget.children[0].children
    assert [s.description for s in sliders] == ["i (x)", "j (y)", "k (z)"]
    # The sliders start at the GTV centroid: voxel (44, 15, 24) of the 60 × 50 × 40 grid.
    assert [s.value for s in sliders] == [44, 15, 24]
    sliders[2].value = 3  # redraws without error
    with pytest.raises(ValueError, match="backend"):
        viz.view(image, backend="vtk")  # type: ignore[arg-type]


def test_figure_png_is_a_png():
    image, masks = _grid(IDENTITY)
    png = viz.figure_png(viz.plot_planes(image, masks), dpi=40)
    assert png[:8] == PNG_MAGIC
    import matplotlib.image as mpimg

    assert mpimg.imread(io.BytesIO(png)).shape[2] == 4


def test_oblique_grid_is_shown_with_a_warning():
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    image, masks = _grid(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]), shape=(10, 30, 30))
    with pytest.warns(PacsaiWarning, match="oblique"):
        fig = viz.plot_planes(image, masks)
    assert len(fig.axes[0].images) == 1


def test_legend_html_has_a_swatch_per_structure_and_the_dose_scale():
    html = viz.legend_html(["GTV", "Lung_L"], (6.0, 60.0))
    gtv = "rgb({},{},{})".format(*(round(c * 255) for c in viz.structure_color("GTV")))
    assert f"background:{gtv}" in html and ">GTV</span>" in html and ">Lung_L</span>" in html
    assert "6.0 Gy" in html and "60.0 Gy" in html and "linear-gradient" in html
    assert "dose" not in viz.legend_html(["GTV"])  # no dose, no scale


def test_planes_with_dose_carry_the_wash_colour_scale():
    image, masks = _grid(IDENTITY)
    dose = like(image, np.linspace(0, 60, image.size, dtype=np.float32).reshape(image.shape))
    fig = viz.plot_planes(image, masks, dose, center=CUBE_MM, prescription_gy=60.0)
    (bar,) = [ax for ax in fig.axes if ax.get_gid() == "dose-colorbar"]
    assert bar.get_ylabel() == "dose (Gy)"
    low, high = bar.get_ylim()
    assert low == pytest.approx(18.0) and high == pytest.approx(64.2)  # 30 % of Rx .. 107 % of Rx
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:2] == ["BODY", "GTV"] and "57.0 Gy (95% Rx)" in labels
    assert not [ax for ax in viz.plot_planes(image, masks).axes if ax.get_gid() == "dose-colorbar"]


VIEW_CELL = """
import numpy as np
from pacsai import viz
from pacsai.imaging.geometry import like, make_volume
image = make_volume(np.zeros((8, 10, 12), np.int16), np.diag([2.0, 2.0, 2.0, 1.0]), name="CT")
cube = np.zeros((8, 10, 12), bool)
cube[3:5, 4:6, 5:7] = True
gtv = like(image, cube)
viewer = viz.view(image, structures={"GTV": gtv})
print("backend", viewer.backend)
viewer
"""


def _run_in_kernel(cell_id: str | None) -> tuple[str, set[str]]:
    """Execute VIEW_CELL in a real pacsai kernel as a frontend would (with a cell id) or as nbclient does."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="pacsai", env={k: v for k, v in os.environ.items() if k != "PACSAI_VIEWER"})
    try:
        content = {"code": VIEW_CELL, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        msg = kc.session.msg("execute_request", content, metadata={"cellId": cell_id} if cell_id else {})
        kc.shell_channel.send(msg)
        reply = kc.get_shell_msg(timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        text, mimes = "", set()
        while True:
            out = kc.get_iopub_msg(timeout=30)
            if out["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                continue
            if out["msg_type"] == "stream":
                text += out["content"]["text"]
            elif out["msg_type"] in ("execute_result", "display_data"):
                mimes |= set(out["content"]["data"])
            elif out["msg_type"] == "status" and out["content"]["execution_state"] == "idle":
                return text, mimes
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.slow
def test_auto_builds_the_widget_for_a_frontend_and_only_the_picture_for_papermill():
    pytest.importorskip("ipyniivue")
    text, mimes = _run_in_kernel("cell-1")  # JupyterLab, Notebook 7 and VS Code send the cell id
    assert "backend niivue" in text and "application/vnd.jupyter.widget-view+json" in mimes
    text, mimes = _run_in_kernel(None)  # papermill / nbconvert --execute (nbclient) send none
    assert "backend static" in text and mimes == {"image/png", "text/plain"}


def _coarse_dose(image):
    """60 Gy at the cube on a 4 mm grid of the same frame of reference, falling off linearly: on another grid."""
    coarse, _ = _grid(IDENTITY, shape=(20, 25, 30), spacing=(4.0, 4.0, 4.0))
    k, j, i = np.meshgrid(*(np.arange(n) for n in coarse.shape), indexing="ij")
    xyz = (np.stack([i, j, k, np.ones_like(i)], -1).astype(float) @ coarse.attrs["affine"].T)[..., :3]
    return like(coarse, np.clip(60.0 - np.linalg.norm(xyz - CUBE_MM, axis=-1), 0, None))


def _pixel_centres(image) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal and vertical mm of the pixel centres of an image drawn with an extent."""
    left, right, bottom, top = image.get_extent()
    ny, nx = image.get_array().shape
    return (left + (np.arange(nx) + 0.5) * (right - left) / nx, bottom + (np.arange(ny) + 0.5) * (top - bottom) / ny)


@pytest.mark.parametrize("direction", [IDENTITY, FLIPPED, PERMUTED], ids=["identity", "flipped", "permuted"])
def test_dose_planes_are_the_dose_resampled_onto_the_whole_image_grid(direction):
    # Only the three planes are resampled: each pixel must hold the value of the whole dose resampled onto the
    # image grid at that pixel's patient position (planes through the cube centre, a voxel centre of every grid).
    from pacsai.imaging.dose import resample
    from pacsai.imaging.geometry import world_to_index

    image, masks = _grid(direction)
    dose = _coarse_dose(image)
    whole = np.asarray(resample(dose, like=image, order=1).values)
    fig = viz.plot_planes(image, masks, dose, prescription_gy=60.0)
    x, y, z = CUBE_MM
    for ax, to_xyz in zip(fig.axes[:3], (lambda h, v: (h, v, z + 0 * h), lambda h, v: (h, y + 0 * h, v),
                                           lambda h, v: (x + 0 * h, h, v)), strict=True):
        (wash,) = [im for im in ax.images if im.get_gid() == "dose-wash"]
        hh, vv = np.meshgrid(*_pixel_centres(wash))
        xyz = np.stack(to_xyz(hh.ravel(), vv.ravel()), axis=1)
        i, j, k = np.rint(world_to_index(image.attrs["affine"], xyz)).astype(int).T
        expected = whole[k, j, i].reshape(hh.shape)
        np.testing.assert_allclose(np.ma.getdata(wash.get_array()), expected, atol=1e-9)


def _vertex_set(paths) -> set[tuple[float, float]]:
    return {(round(float(x), 6), round(float(y), 6)) for p in paths for x, y in p.vertices}


def test_outlines_are_the_lines_axes_contour_draws():
    # Outlines are computed on the box around each structure / dose level: the very lines of Axes.contour on the
    # whole plane, vertex for vertex.
    from matplotlib.figure import Figure

    image, masks = _grid(IDENTITY)
    ring = np.asarray(masks["BODY"].values) & ~np.asarray(masks["GTV"].values)  # a hole inside: two lines
    dose = _coarse_dose(image)
    fig = viz.plot_planes(image, {"Ring": like(image, ring)}, dose, center=CUBE_MM, prescription_gy=60.0)
    axial = fig.axes[0]
    (grey,) = [im for im in axial.images if im.get_gid() is None]
    h, v = _pixel_centres(grey)
    (wash,) = [im for im in axial.images if im.get_gid() == "dose-wash"]
    ref_ax = Figure().subplots()
    kz = int(np.argmin(np.abs(image.coords["z"].values - CUBE_MM[2])))
    ours = next(c for c in axial.collections if c.get_gid() == "structure:Ring")
    ref = ref_ax.contour(h, v, ring[kz].astype(np.float32), levels=[0.5])
    assert len(ours.get_paths()) == 2
    assert _vertex_set(ours.get_paths()) == _vertex_set(ref.get_paths())
    dose_plane = np.ma.getdata(wash.get_array())
    for gy in (57.0, 30.0):
        ref = ref_ax.contour(h, v, dose_plane, levels=[gy])
        ours = next(c for c in axial.collections if c.get_gid() == f"isodose:{gy:.2f}")
        assert _vertex_set(ours.get_paths()) == _vertex_set(ref.get_paths())


def test_a_figure_is_drawn_once_per_display_even_with_a_png_printer_for_figures(monkeypatch):
    # The inline backend registers a PNG printer for every matplotlib figure (bbox "tight": two draws) once pyplot
    # is imported, and IPython prefers it to _repr_png_: a PlotFigure publishes its own PNG, drawn once.
    from IPython.core.formatters import DisplayFormatter
    from matplotlib.figure import Figure

    formatter = DisplayFormatter()
    printed: list[Figure] = []
    formatter.formatters["image/png"].for_type(Figure, lambda fig: printed.append(fig) or b"")
    drawn: list[Figure] = []
    real = viz.figure_png
    monkeypatch.setattr(viz, "figure_png", lambda fig, **kw: drawn.append(fig) or real(fig, **kw))
    published: list[tuple] = []
    monkeypatch.setattr("IPython.display.display", lambda *objs, **kw: published.append((objs, kw)))
    image, masks = _grid(IDENTITY)
    fig = viz.plot_planes(image, masks)
    assert formatter.format(fig) == ({}, {})  # nothing left for the formatters: the figure published itself
    assert drawn == [fig] and not printed
    ((bundle,), kw), = published
    assert kw == {"raw": True} and set(bundle) == {"image/png", "text/plain"}
    assert base64.b64decode(bundle["image/png"])[:8] == PNG_MAGIC


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_fixed_layouts_keep_labels_and_legends_inside_the_figure_and_apart():
    # The comparison and DVH figures have fixed margins (no layout engine): everything must still fit.
    image, masks = _grid(IDENTITY)
    dvhs = {"GTV": (np.array([0.0, 60.0, 62.0]), np.array([100.0, 98.0, 0.0])),
            "Lung_L": (np.array([0.0, 20.0, 40.0]), np.array([100.0, 30.0, 0.0]))}
    for fig in (viz.plot_comparison(image, masks, image, masks), viz.plot_dvh(dvhs, prescription_gy=60.0),
                viz.plot_planes(image, masks, _coarse_dose(image), prescription_gy=60.0)):
        viz.figure_png(fig)
        renderer = fig.canvas.get_renderer()
        boxes = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_gid() != "dose-colorbar"]
        boxes += [legend.get_window_extent(renderer) for legend in fig.legends]
        for n, box in enumerate(boxes):
            assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
            assert not any(_overlap(box, other) for other in boxes[n + 1:])
