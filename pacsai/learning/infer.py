"""Segment a volume with a registered model: sliding-window inference, masks back on the input grid exactly.

The model's MLflow metadata (``metadata["pacsai"]``, written by :func:`pacsai.learning.train.log_model`) says how
it was trained; :func:`segment` repeats that preprocessing (:func:`pacsai.learning.dataset.preprocess_image`),
runs the network on the training grid, and maps each structure's probability back onto the input grid by
trilinear interpolation (label-probability resampling) before thresholding at 0.5 and applying the model's
post-processing rules (:mod:`pacsai.learning.postprocess`). The returned masks have the input's shape and affine,
whatever its spacing or orientation.

Loading never unpickles: :func:`load_model` downloads the model folder, rebuilds the network from its JSON
config and reads the ``.npz`` weights (:mod:`pacsai.learning.modelio`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
import xarray as xr
from scipy import ndimage

from pacsai.errors import TrackingError, VolumeError
from pacsai.imaging.geometry import affine_of, like, spacing_of, voxel_volume_cc
from pacsai.learning.dataset import PreprocessSpec, match_structures, preprocess_image, sample
from pacsai.learning.postprocess import Rule, apply_rule, grow_below_hu
from pacsai.learning.train import Head, predict_probabilities, tta_probabilities

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.cohort import Cohort
    from pacsai.config import Settings
    from pacsai.pacs import Pacs

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A network with the metadata needed to apply it, and what it was trained on.

    Attributes
    ----------
    net, spec, patch_size, overlap, head
        The network and how to apply it.
    uri
        What it was loaded from (``models:/name@champion`` ...).
    name, version, run_id
        The registry entry and the training run ("" where the URI is not a registry URI).
    domain
        The training domain (:func:`pacsai.domain.training_domain`; {} for a model that has none).
    postprocess
        Post-processing rules per structure (JSON, :mod:`pacsai.learning.postprocess`).
    card
        The model card (markdown; "" if none was logged).
    experiment
        The training experiment config (with its ``validation:`` block).
    """

    net: torch.nn.Module
    spec: PreprocessSpec
    patch_size: tuple[int, int, int]
    overlap: float
    uri: str
    head: Head
    name: str = ""
    version: str = ""
    run_id: str | None = None
    domain: Mapping[str, Any] = field(default_factory=dict)
    postprocess: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    card: str = ""
    experiment: Mapping[str, Any] = field(default_factory=dict)

    def rule(self, structure: str) -> Rule:
        return Rule.from_dict(self.postprocess.get(structure) or {}, structure=structure)


def load_model(
    model: str, *, device: str | torch.device | None = None, settings: Settings | None = None
) -> LoadedModel:
    """Load a model logged by pacsai from ``models:/name@alias``, ``models:/name/3`` or ``runs:/ID/model``.

    The network is rebuilt from code and its weights read from ``.npz`` (``allow_pickle=False``): nothing in the
    store is unpickled or executed.
    """
    from pacsai import tracking
    from pacsai.learning.modelio import build_from_dir, find_model_dir

    mlflow = tracking._mlflow()
    uri = tracking.tracking_uri(settings=settings)
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    try:
        with tracking.using_store(uri):
            info = mlflow.models.get_model_info(model)
            local = mlflow.artifacts.download_artifacts(artifact_uri=model)
    except Exception as err:
        raise TrackingError(
            f"cannot load model {model} from {uri}: {err}; check the URI (pacsai ui lists registered models)"
        ) from err
    meta = (info.metadata or {}).get("pacsai")
    if not meta:
        raise TrackingError(
            f"model {model} has no pacsai metadata (preprocessing); it was not logged by pacsai"
        )
    model_dir = find_model_dir(local)
    net, config = build_from_dir(model_dir, device=dev)
    spec = PreprocessSpec.from_dict(config["preprocess"])
    card_path = model_dir / "model_card.md"
    ref = tracking.resolve_model(model, settings=settings) if model.startswith("models:/") else None
    card = card_path.read_text() if card_path.is_file() else ""
    if ref is not None and card.startswith(f"# Model card: {ref.name}\n"):  # written before it had a version
        card = f"# Model card: {ref.name} v{ref.version}" + card[len(f"# Model card: {ref.name}") :]
    pz, py, px = (int(p) for p in config["patch_size"])  # a 3D network's patch (z, y, x)
    return LoadedModel(
        net=net,
        spec=spec,
        head=Head.from_dict(config.get("head") or {}, spec.structures),
        patch_size=(pz, py, px),
        overlap=float(config.get("overlap", 0.25)),
        uri=model,
        name=ref.name if ref else "",
        version=ref.version if ref else "",
        run_id=ref.run_id if ref else info.run_id,
        domain=dict(meta.get("domain") or {}),
        postprocess=dict(config.get("postprocess") or {}),
        card=card,
        experiment=dict(meta.get("experiment") or {}),
    )


def set_threads(threads: int) -> None:
    """Compute threads of this process's inference (torch's intra-op pool); at least 1."""
    torch.set_num_threads(max(1, int(threads)))


def _device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def segment(
    volume: xr.DataArray,
    *,
    model: str | LoadedModel,
    structures: Sequence[str] | None = None,
    return_uncertainty: bool = False,
    threshold: float = 0.5,
    settings: Settings | None = None,
) -> dict[str, xr.DataArray] | tuple[dict[str, xr.DataArray], dict[str, xr.DataArray]]:
    """Segment ``volume`` (HU) → ``{structure: bool mask}`` on ``volume``'s grid.

    Parameters
    ----------
    volume
        The image, a pacsai volume (dims z, y, x; ``attrs["affine"]``) in HU.
    model
        A model URI (``models:/name@champion``, ``models:/name/3``, ``runs:/RUN/model``) or a
        :class:`LoadedModel` (to reuse one across many volumes).
    structures
        Subset of the model's structures to return; default all.
    return_uncertainty
        Also return, per structure, a test-time-augmentation uncertainty map on the input grid: the
        standard deviation of the probability over the plain prediction and flips along the
        cranio-caudal (z) and antero-posterior (y) axes (no left-right flip: the model knows left from right).
    threshold
        Probability at or above which a voxel is inside.
    settings
        Settings (tracking URI); default :func:`pacsai.load_settings`.

    Returns
    -------
    dict, or (dict, dict) with ``return_uncertainty``
        Boolean masks (post-processed by the model's rules) and float32 uncertainty maps, with exactly
        ``volume``'s shape and affine.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model, settings=settings)
    names = list(loaded.spec.structures)
    wanted = list(structures) if structures is not None else names
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise VolumeError(f"model {loaded.uri} does not segment {unknown}; it knows {names}")
    if volume.ndim != 3:
        raise VolumeError(f"segment needs a 3D volume (z, y, x); got dims {volume.dims}")
    image, _ = preprocess_image(volume, loaded.spec)
    device = _device(loaded.net)
    x = image.values[None]
    spread = None
    if return_uncertainty:
        probs, spread = tta_probabilities(
            loaded.net, x, patch_size=loaded.patch_size, device=device, overlap=loaded.overlap, head=loaded.head
        )
    else:
        probs = predict_probabilities(
            loaded.net, x, patch_size=loaded.patch_size, device=device, overlap=loaded.overlap, head=loaded.head
        )
    src, dst = affine_of(image), affine_of(volume)
    voxel_cc = float(voxel_volume_cc(volume))
    rules = {name: loaded.rule(name) for name in names}
    growing = any(rules[name].grow_below_hu is not None for name in wanted)
    # a structure that grows into the air needs every other structure (what it may not take) and the BODY
    computed = names if growing else wanted
    raw: dict[str, np.ndarray] = {}
    for name in computed:
        c = names.index(name)
        # only where the structure can be: interpolated values below the threshold everywhere around stay below
        # it, so the block holding the voxels ≥ threshold (plus one voxel) gives the same mask for less work
        box = _support(probs[c] >= min(threshold, 0.5))
        prob = _to_input_grid(probs[c], src, dst, volume.shape, box=box)
        raw[name] = apply_rule(prob >= threshold, rules[name], voxel_cc=voxel_cc)
    if growing:
        raw = grow_below_hu(raw, np.asarray(volume.values), rules, spacing_zyx=_spacing_zyx(volume))
    masks: dict[str, xr.DataArray] = {}
    uncertainty: dict[str, xr.DataArray] = {}
    for name in wanted:
        c = names.index(name)
        masks[name] = like(volume, raw[name], name=name, source_model=loaded.uri)
        if spread is not None:
            # the spread is kept where it is at least 1 % (0 farther away, where no prediction was in doubt)
            ubox = _support(spread[c] >= 0.01)
            unc = _to_input_grid(spread[c], src, dst, volume.shape, box=ubox).astype(np.float32)
            uncertainty[name] = like(volume, unc, name=f"{name}_uncertainty", source_model=loaded.uri)
    if return_uncertainty:
        return masks, uncertainty
    return masks


def _spacing_zyx(volume: xr.DataArray) -> tuple[float, float, float]:
    sx, sy, sz = (float(v) for v in spacing_of(volume))
    return (sz, sy, sx)


def _support(region: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box of ``region`` plus one voxel (None: empty)."""
    if not region.any():
        return None
    box = ndimage.find_objects(region.astype(np.int8))[0]
    z, y, x = (slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(box, region.shape, strict=True))
    return z, y, x


def _to_input_grid(
    prob: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, ...],
    *,
    box: tuple[slice, slice, slice] | None | Literal["all"] = "all",
) -> np.ndarray:
    """Trilinear probability on the training grid → the input grid (0 outside the training crop).

    Only the block of the input grid that the crop covers is interpolated: a 512×512 CT has far more
    voxels outside the body box than inside.
    """
    out = np.zeros(dst_shape, dtype=np.float32)
    if box is None:  # nothing of the structure on the training grid
        return out
    if box != "all":
        shift = np.eye(4)
        shift[:3, 3] = [box[2].start, box[1].start, box[0].start]
        src_affine = np.asarray(src_affine) @ shift
        prob = prob[box]
    nz, ny, nx = prob.shape
    corners = np.array([[i, j, k, 1.0] for i in (-1, nx) for j in (-1, ny) for k in (-1, nz)])
    to_dst = np.linalg.inv(dst_affine) @ src_affine
    ijk = (corners @ to_dst.T)[:, :3]
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, None)
    hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, np.array(dst_shape[::-1]))
    if np.any(hi <= lo):
        return out
    block = dst_affine.copy()
    block[:3, 3] = (dst_affine @ np.array([lo[0], lo[1], lo[2], 1.0]))[:3]
    shape = (int(hi[2] - lo[2]), int(hi[1] - lo[1]), int(hi[0] - lo[0]))
    out[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = sample(
        prob.astype(np.float32), src_affine, block, shape, order=1, cval=0.0
    )
    return out


def evaluate_cohort(
    pacs: Pacs,
    cohort: Cohort,
    *,
    model: str | LoadedModel,
    tolerance_mm: float = 2.0,
    with_dose: bool = True,
    settings: Settings | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Segment every image series of ``cohort`` and compare with its RTSTRUCT (and plan dose) on its own grid.

    Parameters
    ----------
    pacs, cohort
        The PACS and the series to evaluate (a pseudonymised cohort where the table goes to MLflow).
    model
        Model URI or :class:`LoadedModel`; every structure it outputs gets a row, also those the RTSTRUCT lacks
        (state "missing").
    tolerance_mm
        τ of the surface Dice and the added path length.
    with_dose
        Read the study's total plan dose (the last RTDOSE with DoseSummationType PLAN/MULTI_PLAN) where there is
        one and add the dose differences (:func:`pacsai.learning.evaluate.dose_aware_agreement`).

    Returns
    -------
    pandas.DataFrame
        One row per series × structure, :data:`pacsai.learning.evaluate.AGREEMENT_COLUMNS`, ``patient`` as in the
        cohort table.
    """
    from tqdm.auto import tqdm

    from pacsai.learning.dataset import load_reference
    from pacsai.learning.evaluate import dose_aware_agreement, plan_dose_of_study

    loaded = model if isinstance(model, LoadedModel) else load_model(model, settings=settings)
    outputs = list(loaded.spec.structures)
    tables = []
    for row in tqdm(list(cohort.table.itertuples()), desc="evaluate", unit="series", disable=not progress):
        available = match_structures(row.roi_names, outputs) if len(row.roi_names) else {}
        volume, truth = load_reference(pacs, row, [s for s in outputs if s in available])
        result = segment(volume, model=loaded)
        pred = result[0] if isinstance(result, tuple) else result
        dose = None
        if with_dose:
            dose, why = plan_dose_of_study(pacs, str(row.study_instance_uid))
            if dose is None:
                logger.info("series %s: geometry only (%s)", row.series_instance_uid, why)
        tables.append(
            dose_aware_agreement(
                pred, truth, dose, tolerance_mm=tolerance_mm, structures=outputs, patient=str(row.patient_id)
            )
        )
    return pd.concat(tables, ignore_index=True)


def segment_many(
    volumes: Mapping[str, xr.DataArray], *, model: str, settings: Settings | None = None, **options: Any
) -> dict[str, dict[str, xr.DataArray] | tuple[dict[str, xr.DataArray], dict[str, xr.DataArray]]]:
    """:func:`segment` for several volumes, loading the model once (each value as :func:`segment` returns it:
    masks, or (masks, uncertainty) with ``return_uncertainty=True``)."""
    loaded = load_model(model, settings=settings)
    return {key: segment(vol, model=loaded, **options) for key, vol in volumes.items()}
