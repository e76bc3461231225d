"""pacsai.report.handoff: what travels to the report's kernel arrives bit for bit, in a fraction of the bytes."""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest

from pacsai.errors import PacsConnectionError, ReportError
from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.report import handoff
from pacsai.report.handoff import dumps
from pacsai.report.params import validate_parameters


def _volume(values, name):
    return make_volume(values, affine_from((1.0, 2.0, 3.0), np.eye(3), (0.8, 0.8, 2.5)), name=name)


def test_masks_travel_bit_packed_and_an_image_held_twice_once():
    rng = np.random.default_rng(7)
    image = rng.normal(0.0, 300.0, (20, 64, 64)).astype(np.float32)
    image[0, 0, :2] = (-0.0, np.nan)  # a signed zero and a NaN must survive as they are
    masks = {f"S{k}": _volume(rng.random((20, 64, 64)) < 0.3, f"S{k}") for k in range(4)}
    masks["odd"] = _volume(np.zeros((20, 64, 65), bool), "odd")  # a voxel count that is no multiple of 8
    masks["odd"].values[-1, -1, -1] = True
    masks["copy"] = _volume(masks["S0"].values.copy(), "copy")  # equal masks stay two arrays
    gathered = {"current": _volume(image, "CT"), "reference": _volume(image.copy(), "CT"), "masks": masks}

    packed = dumps(gathered)
    plain = pickle.dumps(gathered, protocol=pickle.HIGHEST_PROTOCOL)
    # masks: 1 bit a voxel instead of a byte; the second copy of the image: a reference to the first
    assert len(packed) < 0.4 * len(plain)
    back = pickle.loads(packed)
    for key in ("current", "reference"):
        assert back[key].values.tobytes() == image.tobytes() and back[key].dtype == np.float32
        assert back[key].identical(gathered[key])
    for name, mask in masks.items():
        assert back["masks"][name].dtype == bool and back["masks"][name].identical(mask)
    back["masks"]["copy"].values[:] = False  # a reader editing one mask edits no other
    assert back["masks"]["S0"].values.any()


def test_a_ct_in_whole_hounsfield_units_travels_as_int16_and_arrives_as_it_was():
    rng = np.random.default_rng(8)
    hu = rng.integers(-1024, 3072, (20, 64, 64)).astype(np.float32)
    almost = hu.copy()
    almost[5, 5, 5] = 0.5  # one value that is no whole number: the image travels as it is
    signed_zero = hu.copy()
    signed_zero[1, 1, 1] = -0.0  # int16 has no -0: as it is
    wide = hu.astype(np.float64)
    wide[0, 0, 0] = 40000.0  # beyond int16: as it is
    images = {"ct": hu, "almost": almost, "signed_zero": signed_zero, "wide": wide}
    packed = dumps(images)
    assert len(packed) < sum(a.nbytes for a in images.values()) - hu.nbytes // 2 + 4096
    back = pickle.loads(packed)
    for name, values in images.items():
        assert back[name].dtype == values.dtype and back[name].tobytes() == values.tobytes(), name


def test_a_kernel_waits_for_announced_inputs_and_stops_on_the_gatherers_error(tmp_path):
    """The kernel starts while `pacsai report` still gathers: it waits for the announced file, and a failed
    gathering ends the wait with that error; a file never announced is an error at once, as before."""
    params = validate_parameters(patient_id="SYN-00001", structures_from="model", model_uri="models:/m/1")
    path = handoff.announce(tmp_path)
    assert path.with_name(path.name + ".pending").exists()

    def write_late() -> None:
        time.sleep(0.5)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(pickle.dumps({"not": "a hand-off"}))
        tmp.replace(path)  # as gather_to_file writes it
        path.with_name(path.name + ".pending").unlink()

    writer = threading.Thread(target=write_late)
    started = time.monotonic()
    writer.start()
    with pytest.raises(ReportError, match="is not a hand-off file"):  # it read the file written 0.5 s later
        handoff.summary_from_file(path, params)
    assert time.monotonic() - started >= 0.5
    writer.join()
    handoff.remove(tmp_path)

    class UnreachablePacs:  # fault injection: the PACS connection fails as a real one would (PacsConnectionError)
        url = "http://127.0.0.1:9/dicom-web"

        def __getattr__(self, name):
            raise PacsConnectionError(f"{self.url} cannot be reached (connection refused); is the PACS running?")

    path = handoff.announce(tmp_path)
    with pytest.raises(PacsConnectionError):
        handoff.gather_to_file(params, UnreachablePacs(), tmp_path)
    assert not path.with_name(path.name + ".pending").exists()
    with pytest.raises(ReportError, match="could not gather this report's inputs: PacsConnectionError: .*refused"):
        handoff.summary_from_file(path, params)
    handoff.remove(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ReportError, match="cannot read the report's gathered inputs"):  # never announced
        handoff.summary_from_file(path, params)
