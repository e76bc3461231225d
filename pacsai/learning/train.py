"""Training: cohort from the PACS → MONAI network, tracked in MLflow, registered (without pickle) with a model card.

:func:`train` does what ``pacsai train EXPERIMENT.yaml`` does, in small steps:

1. :func:`prepare_data`: select the cohort, split it by patient (``split.json``), preprocess (cached under
   ``PACSAI_CACHE_DIR``) with each case's image statistics and structure volumes;
2. :func:`make_head` and :func:`build_training`: the output head (containment measured on the labels), the
   network (initialised from the experiment's seed without touching the global random state), AdamW and a
   warm-up + cosine learning-rate schedule;
3. :func:`train_epoch`: ``steps_per_epoch`` batches of class-balanced patches (:class:`PatchSampler`), DiceCE loss
   (Dice per class, so large organs do not drown small ones);
4. :func:`validate_cases` every ``val_every`` epochs (``val_dice_<structure>``), best weights kept;
5. :func:`save_checkpoint` every epoch (``last.pt``, read back with ``weights_only=True`` for ``--resume``);
6. :func:`register`: weights as ``.npz`` + JSON config as an MLflow pyfunc model (:mod:`.modelio`), the training
   domain (``domain.json``), the post-processing rules, the experiment config and the model card.

Under ``torchrun`` (``WORLD_SIZE`` > 1, :mod:`.distributed`) it joins a process group (NCCL on GPUs, Gloo
otherwise), one process per node fills the caches first, every rank draws its own patches (its share of the cases,
seed + rank) and DDP averages the gradients; only rank 0 validates and talks to MLflow, and broadcasts its best
epoch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from pacsai.errors import ConfigError, PacsaiWarning, TrackingError
from pacsai.learning import distributed as ddp
from pacsai.learning.dataset import Augment, Case, PatchSampler, PreprocessSpec, load_cases
from pacsai.learning.modelio import load_state_dict, save_state_dict
from pacsai.learning.networks import build_network, divisor
from pacsai.learning.postprocess import Rule, apply_rules, grow_below_hu, parse_rules, rules_to_dict

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.cohort import Cohort
    from pacsai.config import Settings
    from pacsai.pacs import Pacs
    from pacsai.tracking import RunContext

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "split": {"seed": 0, "val": 0.2, "test": 0.2},
    "preprocess": {"spacing_mm": [4.0, 4.0, 4.0], "window": [-1000.0, 500.0], "margin_mm": 8.0},
    "model": {"architecture": "UNet"},
    "train": {
        "epochs": 20,
        "steps_per_epoch": 20,
        "batch_size": 2,
        "patch_size": [64, 64, 64],
        "class_weights": {},
        "augment": {},
        "warmup": 0.1,
        "lr": 2e-3,
        "weight_decay": 1e-5,
        "val_every": 1,
        "seed": 0,
        "overlap": 0.25,
        "lambda_dice": 1.0,
        "lambda_ce": 1.0,
    },
}


# ---------------------------------------------------------------------------------------------------- config


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set ``cfg["a"]["b"] = value`` for ``key = "a.b"`` (intermediate mappings are created)."""
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key}: {p!r} is not a mapping in the experiment")
        node = nxt
    node[parts[-1]] = value


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", "model.channels=[8,16]"]`` → ``{"train.epochs": 3, ...}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. train.epochs=5")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {err}") from err
    return out


def load_experiment(
    source: str | Path | Mapping[str, Any],
    *,
    overrides: Mapping[str, Any] | None = None,
    smoke: bool = False,
) -> dict[str, Any]:
    """Read an experiment (YAML path or mapping) and apply defaults, the ``smoke:`` block and overrides.

    Parameters
    ----------
    source
        The experiment YAML (see ``experiments/demo.yaml``) or its content.
    overrides
        Dotted keys → values (``--set``); applied last.
    smoke
        Apply the experiment's ``smoke:`` mapping (dotted keys): tiny sizes for tests and CI.
    """
    if isinstance(source, Mapping):
        doc = dict(source)
    else:
        path = Path(source)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"experiment file {path} does not exist") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"experiment file {path} is not valid YAML: {err}") from err
    cfg = _deep_merge(DEFAULTS, doc)
    smoke_block = cfg.pop("smoke", {}) or {}
    if smoke:
        for k, v in smoke_block.items():
            set_dotted(cfg, k, v)
    for k, v in (overrides or {}).items():
        set_dotted(cfg, k, v)
    cfg["smoke"] = bool(smoke)
    for required in ("name", "structures"):
        if not cfg.get(required):
            raise ConfigError(f"the experiment needs a {required!r} entry")
    if not cfg["model"].get("name"):
        raise ConfigError("the experiment needs model.name (the registered model name)")
    div = divisor(cfg["model"])
    patch = cfg["train"]["patch_size"]
    if len(patch) != 3 or any(int(p) % div for p in patch):
        raise ConfigError(f"train.patch_size {patch} must be three multiples of {div} for this network")
    stray = sorted(set(cfg["train"].get("class_weights") or {}) - {"background", *cfg["structures"]})
    if stray:
        raise ConfigError(f"train.class_weights names {stray}: use 'background' or one of {cfg['structures']}")
    parse_rules(cfg.get("postprocess"), list(cfg["structures"]))  # refuse a bad rule before hours of training
    return cfg


def preprocess_spec(cfg: Mapping[str, Any]) -> PreprocessSpec:
    pp = cfg["preprocess"]
    return PreprocessSpec(
        spacing_mm=tuple(pp["spacing_mm"]),
        window=tuple(pp["window"]),
        structures=tuple(cfg["structures"]),
        body_threshold_hu=float(pp.get("body_threshold_hu", -500.0)),
        margin_mm=float(pp.get("margin_mm", 8.0)),
        antialias=bool(pp.get("antialias", False)),
    )


def flat_params(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → ``{"train.epochs": 20, ...}`` for ``mlflow.log_params``."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_params(v, prefix=f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


# ---------------------------------------------------------------------------------------------------- loop


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    run_id: str
    model_name: str
    version: str
    model_uri: str
    best_epoch: int
    best_val_dice: Mapping[str, float]
    epochs: int
    seconds: float
    checkpoint: Path
    split: Mapping[str, list[str]] = field(default_factory=dict)


def dice_per_channel(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Dice per channel of boolean (C, ...) arrays; 1 where both are empty."""
    axes = tuple(range(1, pred.ndim))
    inter = np.logical_and(pred, ref).sum(axis=axes)
    total = pred.sum(axis=axes) + ref.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


@dataclass(frozen=True)
class Head:
    """How network outputs become per-structure probabilities.

    ``softmax``: one class per structure plus background (class 0), mutually exclusive, later structures in the
    list win where ROIs overlap; a structure that contains others (``contains``, measured on the training labels,
    e.g. BODY contains every organ) gets the sum of its own and their class probabilities. ``sigmoid``: one
    independent channel per structure.
    """

    kind: str = "softmax"
    structures: tuple[str, ...] = ()
    contains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return len(self.structures) + (1 if self.kind == "softmax" else 0)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "contains": {k: list(v) for k, v in self.contains.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], structures: Sequence[str]) -> Head:
        return cls(
            kind=str(d.get("kind", "sigmoid")),
            structures=tuple(structures),
            contains={k: tuple(v) for k, v in (d.get("contains") or {}).items()},
        )

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, channels, ...) logits → (B, structures, ...) probabilities."""
        if self.kind == "sigmoid":
            return torch.sigmoid(logits)
        classes = torch.softmax(logits, dim=1)
        out = []
        for i, name in enumerate(self.structures):
            members = [i + 1] + [self.structures.index(m) + 1 for m in self.contains.get(name, ())]
            out.append(classes[:, members].sum(dim=1))
        return torch.stack(out, dim=1)

    def target(self, label: torch.Tensor) -> torch.Tensor:
        """Multi-label (B, structures, ...) → what the loss expects (class index map for softmax)."""
        if self.kind == "sigmoid":
            return label
        index = torch.zeros_like(label[:, :1])
        for i in range(label.shape[1]):
            index[label[:, i : i + 1] > 0.5] = i + 1  # later structures win where ROIs overlap
        return index


def containment(
    cases: Sequence[Case], structures: Sequence[str], *, fraction: float = 0.95
) -> dict[str, tuple[str, ...]]:
    """Which structures hold others (≥ ``fraction`` of the inner one's voxels, summed over ``cases``)."""
    n = len(structures)
    inter = np.zeros((n, n))
    size = np.zeros(n)
    for c in cases:
        lab = c.label.reshape(n, -1).astype(bool)
        size += lab.sum(axis=1)
        for a in range(n):
            inter[a] += (lab[a][None] & lab).sum(axis=1)
    out: dict[str, tuple[str, ...]] = {}
    for a in range(n):
        # only structures listed later can be inside (earlier ones are overwritten by it in the class map)
        inner = [structures[b] for b in range(a + 1, n) if size[b] > 0 and inter[a, b] >= fraction * size[b]]
        if inner:
            out[structures[a]] = tuple(inner)
    return out


def predict_probabilities(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    patch_size: Sequence[int],
    device: torch.device,
    overlap: float = 0.25,
    head: Head | None = None,
) -> np.ndarray:
    """Per-structure probabilities (C, z, y, x) of a (1, z, y, x) image by sliding-window inference."""
    from monai.inferers import sliding_window_inference

    head = head or Head(kind="sigmoid")
    x = torch.from_numpy(np.ascontiguousarray(image[None])).to(device)
    with torch.no_grad(), _autocast(device):
        logits = sliding_window_inference(
            x,
            roi_size=tuple(int(p) for p in patch_size),
            sw_batch_size=4,
            predictor=net,
            overlap=overlap,
            mode="gaussian",
        )
    if not isinstance(logits, torch.Tensor):  # MONAI types it as a tensor, tuple or dict: a plain network gives one
        raise TypeError(f"the network returned {type(logits).__name__}, not one tensor of logits")
    return head.probabilities(logits.float())[0].cpu().numpy()


def tta_stack(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    patch_size: Sequence[int],
    device: torch.device,
    overlap: float = 0.25,
    head: Head | None = None,
) -> np.ndarray:
    """Probabilities (3, C, z, y, x) of the plain prediction (first) and of flips along z and y (mapped back)."""
    stack = [predict_probabilities(net, image, patch_size=patch_size, device=device, overlap=overlap, head=head)]
    for axis in (1, 2):  # (1, z, y, x) image, (C, z, y, x) probabilities: flip z, then y
        flipped = np.flip(image, axis=axis).copy()
        p = predict_probabilities(net, flipped, patch_size=patch_size, device=device, overlap=overlap, head=head)
        stack.append(np.flip(p, axis=axis))
    return np.stack(stack)


def tta_probabilities(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    patch_size: Sequence[int],
    device: torch.device,
    overlap: float = 0.25,
    head: Head | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Test-time augmentation: (mean, standard deviation) of the probabilities (C, z, y, x) over the plain
    prediction and flips along z and y (no left-right flip: the model knows left from right).

    One definition for the report (:func:`pacsai.learning.infer.segment`) and for the held-out uncertainty the
    model records at training time (:func:`review_held_out`), so the gate compares like with like.
    """
    arr = tta_stack(net, image, patch_size=patch_size, device=device, overlap=overlap, head=head)
    return arr.mean(axis=0), arr.std(axis=0)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # AMP only on CUDA: CPU autocast (bfloat16) is slower than float32 on most CPUs and changes results
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def validate_cases(
    net: torch.nn.Module,
    cases: Sequence[Case],
    *,
    patch_size: Sequence[int],
    device: torch.device,
    overlap: float,
    head: Head | None = None,
) -> np.ndarray:
    """Mean Dice per structure over ``cases`` on the preprocessed grid."""
    net.eval()
    scores = [
        dice_per_channel(
            predict_probabilities(
                net, c.image, patch_size=patch_size, device=device, overlap=overlap, head=head
            )
            >= 0.5,
            c.label.astype(bool),
        )
        for c in cases
    ]
    return np.mean(scores, axis=0)


def _model_pip_requirements() -> list[str]:
    import mlflow
    import monai

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"monai=={monai.__version__}",
        f"numpy=={np.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]


def _signature(n_out: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # -1 everywhere but the channel axis: any batch and any sliding-window (patch) size
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1, -1), name="image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_out, -1, -1, -1), name="logits")]),
    )


@dataclass(frozen=True)
class TrainingData:
    """The cohort, its split and the preprocessed cases of one training run."""

    cohort: Cohort
    split: Mapping[str, list[str]]
    spec: PreprocessSpec
    train_cases: list[Case]
    val_cases: list[Case]


def cache_root(settings: Settings) -> Path:
    """Where preprocessed cases and checkpoints live: inside ``PACSAI_CACHE_DIR``, never beside it."""
    return Path(settings.cache_dir)


def prepare_data(
    cfg: Mapping[str, Any], pacs: Pacs, *, settings: Settings, progress: bool = True
) -> TrainingData:
    """Select the cohort, split it by patient and load (or preprocess and cache) the training/validation cases."""
    from pacsai.cohort import CohortQuery, select_cohort

    query = CohortQuery.from_config(cfg.get("cohort") or {}, structures=cfg["structures"])
    cohort = select_cohort(pacs, query, progress=progress)
    split = cohort.split(
        seed=int(cfg["split"]["seed"]), fractions={k: cfg["split"][k] for k in ("val", "test")}
    )
    spec = preprocess_spec(cfg)
    cache_dir = cache_root(settings) / "preprocessed"
    train_cases = load_cases(
        pacs, cohort, spec, cache_dir=cache_dir, patients=split["train"], progress=progress
    )
    val_patients = split["val"] or split["train"]  # two patients: validate on training data (smoke only)
    val_cases = load_cases(pacs, cohort, spec, cache_dir=cache_dir, patients=val_patients, progress=False)
    return TrainingData(cohort, split, spec, train_cases, val_cases)


def make_head(cfg: Mapping[str, Any], train_cases: Sequence[Case]) -> Head:
    """The output head of the experiment (``model.output``), with containment measured on the training labels."""
    kind = str(cfg["model"].get("output", "softmax"))
    if kind not in ("softmax", "sigmoid"):
        raise ConfigError(f"model.output {kind!r} must be softmax or sigmoid")
    structures = tuple(cfg["structures"])
    return Head(kind=kind, structures=structures, contains=containment(train_cases, structures))


def class_weights(cfg: Mapping[str, Any]) -> list[float]:
    """Patch-centre weights (background, then each structure; 1 where the experiment gives none)."""
    given = cfg["train"].get("class_weights") or {}
    return [float(given.get(name, 1.0)) for name in ("background", *cfg["structures"])]


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` of the steps, then a cosine decay to zero."""
    n_warm = max(1, int(round(warmup * total)))
    if step < n_warm:
        return 0.04 + 0.96 * step / n_warm
    progress = min(1.0, (step - n_warm) / max(1, total - n_warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_training(
    cfg: Mapping[str, Any], head: Head, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Network (initialised from ``train.seed`` under a forked RNG: the global state is left alone), AdamW and
    the per-step schedule of :func:`lr_factor`."""
    tcfg = cfg["train"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tcfg["seed"]))
        net = build_network(cfg["model"], in_channels=1, out_channels=head.channels).to(device)
    optimiser = torch.optim.AdamW(
        net.parameters(), lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"])
    )
    total = int(tcfg["epochs"]) * int(tcfg["steps_per_epoch"])
    warmup = float(tcfg.get("warmup", 0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: lr_factor(step, total, warmup))
    return net, optimiser, scheduler


def make_loss(cfg: Mapping[str, Any], head: Head) -> torch.nn.Module:
    from monai.losses import DiceCELoss

    tcfg = cfg["train"]
    return DiceCELoss(
        sigmoid=head.kind == "sigmoid",
        softmax=head.kind == "softmax",
        to_onehot_y=head.kind == "softmax",
        lambda_dice=float(tcfg["lambda_dice"]),
        lambda_ce=float(tcfg["lambda_ce"]),
        smooth_nr=1e-5,
    )


def train_epoch(
    model: torch.nn.Module,
    sampler: PatchSampler,
    *,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: torch.nn.Module,
    head: Head,
    steps: int,
    batch_size: int,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """``steps`` optimiser steps on fresh patches; returns the mean loss."""
    model.train()
    losses = []
    for _ in range(steps):
        image, label = sampler.batch(batch_size)
        x = torch.from_numpy(image).to(device)
        y = head.target(torch.from_numpy(label).to(device))
        optimiser.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = loss_fn(model(x), y)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
        else:
            loss.backward()
            optimiser.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


def save_checkpoint(path: Path, **state: Any) -> Path:
    """Write a resumable checkpoint atomically (tensors, numbers, strings and plain containers only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pt.tmp")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, device: torch.device) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: a tampered file cannot run code."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as err:
        raise ConfigError(f"checkpoint {path} does not exist; pass a last.pt written by an earlier run") from err
    except Exception as err:  # the restricted unpickler refuses anything but tensors and plain containers
        raise ConfigError(
            f"checkpoint {path} cannot be read safely ({err}); only checkpoints written by pacsai are accepted"
        ) from err


@dataclass(frozen=True)
class HeldOutReview:
    """What one inference pass over held-out cases gives: the metrics and the TTA uncertainty.

    Attributes
    ----------
    metrics
        Mean Dice and HD95 (mm) per structure of the plain prediction after post-processing, on the training
        grid (``{structure: {"dice": ..., "hd95": ...}}``; structures no case has are left out).
    uncertainty
        The model's TTA uncertainty per structure (:func:`pacsai.domain.uncertainty_domain`): what the report's
        gate calls high for this model (a fixed limit would flag every good asymmetric organ of a network not
        trained flip-invariant).
    """

    metrics: dict[str, dict[str, float]]
    uncertainty: dict[str, dict[str, float]]
    #: mean Dice per structure of the plain prediction before post-processing (as :func:`validate_cases`)
    raw_dice: np.ndarray


def review_held_out(
    net: torch.nn.Module,
    cases: Sequence[Case],
    *,
    spec: PreprocessSpec,
    head: Head,
    rules: Mapping[str, Rule],
    patch_size: Sequence[int],
    overlap: float,
    device: torch.device,
) -> HeldOutReview:
    """Metrics and TTA uncertainty of ``net`` on ``cases`` from one pass: the plain prediction that the metrics
    need is the first member of the TTA stack (:func:`tta_stack`), so no case is inferred twice."""
    from pacsai.domain import summarize_uncertainty, uncertainty_domain
    from pacsai.imaging.geometry import make_volume
    from pacsai.learning.evaluate import agreement

    net.eval()
    sx, sy, sz = spec.spacing_mm
    spacing_zyx = (sz, sy, sx)
    voxel_cc = float(np.prod(spec.spacing_mm)) / 1000.0
    rows: dict[str, list[tuple[float, float]]] = {s: [] for s in spec.structures}
    per_case = []
    raw = []
    lo, hi = spec.window
    for case in cases:
        stack = tta_stack(net, case.image, patch_size=patch_size, device=device, overlap=overlap, head=head)
        raw.append(dice_per_channel(stack[0] >= 0.5, case.label.astype(bool)))
        # HU back from the windowed input (exact for any grow_below_hu threshold inside the window)
        hu = case.image[0] * np.float32(hi - lo) + np.float32(lo)
        plain = grow_below_hu(apply_rules(
            {s: stack[0][k] >= 0.5 for k, s in enumerate(spec.structures)}, rules, voxel_cc=voxel_cc
        ), hu, rules, spacing_zyx=spacing_zyx)
        for k, s in enumerate(spec.structures):
            ref = case.label[k].astype(bool)
            if ref.any():
                a = agreement(plain[s], ref, spacing_zyx=spacing_zyx)
                rows[s].append((a.dice, a.hd95))
        mean, std = stack.mean(axis=0), stack.std(axis=0)
        masks = grow_below_hu(
            apply_rules({s: mean[k] >= 0.5 for k, s in enumerate(spec.structures)}, rules, voxel_cc=voxel_cc),
            hu, rules, spacing_zyx=spacing_zyx,
        )
        per_case.append({
            s: summarize_uncertainty(make_volume(np.asarray(masks[s]), case.affine), std[k])
            for k, s in enumerate(spec.structures)
        })
    metrics = {
        s: {"dice": float(np.mean([r[0] for r in v])), "hd95": float(np.nanmean([r[1] for r in v]))}
        for s, v in rows.items()
        if v
    }
    return HeldOutReview(
        metrics=metrics, uncertainty=uncertainty_domain(per_case), raw_dice=np.mean(raw, axis=0)
    )


def train(
    experiment: str | Path | Mapping[str, Any],
    *,
    pacs: Pacs | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    smoke: bool = False,
    resume: str | Path | None = None,
    settings: Settings | None = None,
    progress: bool = True,
    callback: Callable[[int, Mapping[str, float]], None] | None = None,
) -> TrainResult:
    """Train the experiment's model on its cohort, tracked in MLflow, and register the best model.

    Parameters
    ----------
    experiment
        Experiment YAML path or mapping (see :func:`load_experiment`).
    pacs
        A :class:`pacsai.pacs.Pacs`, or a URL; default the settings' PACS.
    overrides
        Dotted config overrides (``{"train.epochs": 3}``).
    smoke
        Apply the experiment's ``smoke:`` block (tiny, seconds).
    resume
        A checkpoint written by an earlier run (``last.pt``): training continues from its epoch, in the same
        MLflow run.
    settings
        :class:`pacsai.config.Settings`; default :func:`pacsai.load_settings`.
    progress
        Show progress bars.
    callback
        Called on rank 0 after every epoch with (epoch, metrics): live curves in a notebook.

    Returns
    -------
    TrainResult
    """
    from tqdm.auto import tqdm

    from pacsai import tracking
    from pacsai.config import load_settings

    settings = settings or load_settings()
    cfg = load_experiment(experiment, overrides=overrides, smoke=smoke)
    dist = ddp.setup()
    tcfg = cfg["train"]
    seed = int(tcfg["seed"])

    if pacs is None or isinstance(pacs, str):
        from pacsai.pacs import connect

        pacs = connect(pacs or (cfg.get("pacs") or {}).get("url"), settings=settings)
    with ddp.main_first(dist):  # one process per node pulls and preprocesses; the others read its cache
        data = prepare_data(cfg, pacs, settings=settings, progress=progress and dist.main)
    spec, cohort, split = data.spec, data.cohort, data.split
    head = make_head(cfg, data.train_cases)
    rules = parse_rules(cfg.get("postprocess"), list(spec.structures))
    net, optimiser, scheduler = build_training(cfg, head, dist.device)
    scaler = torch.amp.GradScaler("cuda", enabled=dist.device.type == "cuda")
    epochs, steps = int(tcfg["epochs"]), int(tcfg["steps_per_epoch"])
    start_epoch, best, best_epoch, run_id = 0, -1.0, -1, None
    rng_state: str | None = None  # the generator's state as the checkpoint keeps it (JSON)
    if resume is not None:
        state = load_checkpoint(resume, dist.device)
        net.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, best_epoch, run_id = (
            int(state["epoch"]) + 1,
            float(state["best"]),
            int(state["best_epoch"]),
            str(state["run_id"]),
        )
        rng_state = state.get("rng")
        if state.get("cohort_hash") not in (None, cohort.content_hash):
            warnings.warn(
                f"resuming from {resume}: the cohort changed since that checkpoint (hash "
                f"{state['cohort_hash'][:12]} → {cohort.content_hash[:12]}); the run now trains on other data",
                PacsaiWarning,
                stacklevel=2,
            )
        logger.info("resuming run %s at epoch %d from %s", run_id, start_epoch, resume)
    model = ddp.wrap(net, dist)  # DDP under torchrun; validation and saving use net itself
    # every rank its own stream; a resumed run continues the stream where the checkpoint left it
    rng = np.random.default_rng(np.random.SeedSequence([seed, dist.rank]))
    sampler = PatchSampler(
        ddp.shard(data.train_cases, dist),
        patch_size=tcfg["patch_size"],
        class_weights=class_weights(cfg),
        rng=rng,
        augment=Augment.from_dict(tcfg.get("augment")),
    )
    if rng_state is not None:
        rng.bit_generator.state = json.loads(rng_state)
    loss_fn = make_loss(cfg, head)
    params = flat_params({k: v for k, v in cfg.items() if k not in ("settings", "pacs")})
    params.update(dist.run_params())

    run_cm: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if dist.main:
        run_cm = tracking.start_run(
            "training",
            experiment=str(cfg["name"]),
            cohort=_logged_cohort(cohort, settings) if run_id is None else None,
            params=params if run_id is None else None,
            run_id=run_id,
            settings=settings,
            tags={"pacsai.model_name": str(cfg["model"]["name"]), "pacsai.smoke": str(bool(smoke)).lower()},
        )
    started = time.perf_counter()
    with run_cm as ctx:
        import mlflow

        # a resumed run keeps writing next to the checkpoint it came from (best.npz lives there)
        run_dir = (
            Path(resume).parent
            if resume is not None
            else cache_root(settings) / "checkpoints" / (ctx.run_id if ctx is not None else f"rank{dist.rank}")
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        if ctx is not None and run_id is None:
            mlflow.log_dict(_split_record(split, cohort, ctx, seed=int(cfg["split"]["seed"])), "split.json")
            # UIDs under the run's keyed hashes, as in the cohort manifest (no DICOM UID in MLflow)
            mlflow.log_dict(
                {
                    ctx.uid_label(c.series_instance_uid): [ctx.uid_label(u) for u in c.sop_instance_uids]
                    for c in [*data.train_cases, *data.val_cases]
                },
                "inputs/instances.json",
            )
            mlflow.log_dict({**spec.to_dict(), "head": head.to_dict()}, "preprocess.json")
        bar = tqdm(
            range(start_epoch, epochs), desc="train", unit="epoch", disable=not (progress and dist.main)
        )
        last_dice = "-"
        for epoch in bar:
            train_loss = train_epoch(
                model,
                sampler,
                optimiser=optimiser,
                scheduler=scheduler,
                loss_fn=loss_fn,
                head=head,
                steps=steps,
                batch_size=int(tcfg["batch_size"]),
                device=dist.device,
                scaler=scaler,
            )
            if not dist.main:
                best_epoch = ddp.broadcast(best_epoch, dist)  # rank 0 validates and chooses
                continue
            metrics = {"train_loss": train_loss, "lr": float(scheduler.get_last_lr()[0])}
            if (epoch + 1) % int(tcfg["val_every"]) == 0 or epoch == epochs - 1:
                dice = validate_cases(
                    net,
                    data.val_cases,
                    patch_size=tcfg["patch_size"],
                    device=dist.device,
                    overlap=float(tcfg["overlap"]),
                    head=head,
                )
                metrics.update({f"val_dice_{s}": float(d) for s, d in zip(spec.structures, dice, strict=True)})
                metrics["val_dice_mean"] = float(np.mean(dice))
                if metrics["val_dice_mean"] > best:
                    best, best_epoch = metrics["val_dice_mean"], epoch
                    save_state_dict(net.state_dict(), run_dir / "best.npz")
                last_dice = f"{metrics['val_dice_mean']:.3f}"
            mlflow.log_metrics(metrics, step=epoch)
            if callback is not None:
                callback(epoch, metrics)
            bar.set_postfix(loss=f"{train_loss:.3f}", val_dice=last_dice)
            save_checkpoint(
                run_dir / "last.pt",
                model=net.state_dict(),
                optimiser=optimiser.state_dict(),
                scheduler=scheduler.state_dict(),
                epoch=epoch,
                best=best,
                best_epoch=best_epoch,
                run_id=ctx.run_id,
                cohort_hash=cohort.content_hash,
                rng=json.dumps(rng.bit_generator.state),
                config=json.dumps(cfg),
            )
            ddp.broadcast(best_epoch, dist)
        seconds = time.perf_counter() - started
        if not dist.main:
            return TrainResult("", "", "", "", best_epoch, {}, epochs, seconds, run_dir / "last.pt", split)
        if not (run_dir / "best.npz").is_file():
            raise TrackingError(f"no checkpoint in {run_dir}: training ran no epoch (epochs={epochs})")
        net.load_state_dict(load_state_dict(run_dir / "best.npz"))
        # one pass over the validation patients: raw Dice, post-processed metrics and TTA uncertainty
        review = review_held_out(
            net,
            data.val_cases,
            spec=spec,
            head=head,
            rules=rules,
            patch_size=tcfg["patch_size"],
            overlap=float(tcfg["overlap"]),
            device=dist.device,
        )
        best_dice = review.raw_dice
        best_val = {s: float(d) for s, d in zip(spec.structures, best_dice, strict=True)}
        mlflow.log_metrics(
            {"best_val_dice_mean": float(np.mean(best_dice)), "best_epoch": best_epoch, "train_seconds": seconds}
        )
        print(f"training took {seconds:.0f} s ({epochs - start_epoch} epochs × {steps} steps)", flush=True)
        version = register(
            net, data=data, cfg=cfg, head=head, rules=rules, ctx=ctx, seconds=seconds, best_epoch=best_epoch,
            review=review,
        )
        return TrainResult(
            run_id=ctx.run_id,
            model_name=str(cfg["model"]["name"]),
            version=version,
            model_uri=f"models:/{cfg['model']['name']}/{version}",
            best_epoch=best_epoch,
            best_val_dice=best_val,
            epochs=epochs,
            seconds=seconds,
            checkpoint=run_dir / "best.npz",
            split={k: [ctx.patient_label(p) for p in v] for k, v in split.items()},
        )


def register(
    net: torch.nn.Module,
    *,
    data: TrainingData,
    cfg: Mapping[str, Any],
    head: Head,
    rules: Mapping[str, Rule],
    ctx: RunContext,
    seconds: float,
    best_epoch: int,
    review: HeldOutReview,
) -> str:
    """Log the trained network with its domain, post-processing, experiment and model card; register it.

    ``review`` is the kept weights' pass over the validation patients (:func:`review_held_out`). Returns the
    registered version.
    """
    import mlflow

    from pacsai import tracking
    from pacsai.domain import training_domain
    from pacsai.learning.card import model_card

    held_out = review.metrics
    # the kept weights on the validation patients after post-processing (val_dice_* are the raw curves)
    mlflow.log_metrics(
        {f"best_val_pp_{m}_{s}": v for s, row in held_out.items() for m, v in row.items() if np.isfinite(v)}
    )
    domain = training_domain(
        [c.stats for c in data.train_cases], [c.volumes_cc for c in data.train_cases], body_region="thorax"
    )
    domain["uncertainty"] = review.uncertainty
    mlflow.log_dict(domain, "domain.json")
    name = str(cfg["model"]["name"])
    table = data.cohort.table
    sources = sorted({str(v) for v in (table["manufacturer"] if "manufacturer" in table else [])} - {"", "nan"})
    card_args: dict[str, Any] = {
        "name": name,
        "run_id": ctx.run_id,
        "experiment": cfg,
        "cohort": {
            "train": len(data.split["train"]),
            "val": len(data.split["val"]),
            "test": len(data.split["test"]),
            "series": len(table),
            "sources": sources or ["pacsai.synthetic (synthetic patients)"],
        },
        "domain": domain,
        "metrics": held_out,
        "postprocess": {s: r.describe() for s, r in rules.items()},
        "train_seconds": seconds,
        "best_epoch": best_epoch,
    }
    info = log_model(
        net.cpu(), spec=data.spec, cfg=cfg, name=name, head=head, rules=rules, domain=domain,
        card=model_card(version=None, **card_args),
    )
    version = str(info.registered_model_version)
    card = model_card(version=version, **card_args)
    mlflow.log_text(card, "model_card.md")
    mlflow.set_tag("pacsai.model_version", version)
    try:  # the card as the version's description, shown on the registry page
        tracking.set_model_card(name, version, card)
    except TrackingError as err:  # the model is registered and usable; the description is a convenience
        logger.warning("%s", err)
    return version


def _logged_cohort(cohort: Cohort, settings: Settings) -> Cohort:
    """The cohort as the training run logs it: pseudonyms and UIDs as keyed hashes under the store's key (as in
    ``split.json`` and the manifest), unless the user allowed identifiers (``PACSAI_LOG_PHI``). The validation
    notebook finds the held-out series again by those hashes (:func:`pacsai.cohort.resolve_cohort`)."""
    from pacsai import tracking

    if settings.log_phi:
        return cohort
    return cohort.pseudonymised(tracking.pseudonym_key(settings=settings))


def _split_record(
    split: Mapping[str, list[str]], cohort: Cohort, ctx: RunContext, *, seed: int
) -> dict[str, Any]:
    """The split as an artifact: pseudonymised patients and the (hashed) image series of each part."""
    table = cohort.table
    out: dict[str, Any] = {"seed": seed, "patients": {}, "series": {}}
    for part, patients in split.items():
        out["patients"][part] = [ctx.patient_label(p) for p in patients]
        series = table[table["patient_id"].isin(set(patients))]["series_instance_uid"]
        out["series"][part] = sorted(ctx.uid_label(str(u)) for u in series)
    return out


def model_config(
    cfg: Mapping[str, Any],
    *,
    spec: PreprocessSpec,
    head: Head,
    rules: Mapping[str, Rule] | None = None,
) -> dict[str, Any]:
    """What a stored model needs to be rebuilt and applied (``model.json`` and ``metadata["pacsai"]``)."""
    network = {k: v for k, v in cfg["model"].items() if k not in ("name",)}
    return {
        "network": network,
        "in_channels": 1,
        "out_channels": head.channels,
        "architecture": str(network.get("architecture", "UNet")),
        "preprocess": spec.to_dict(),
        "patch_size": [int(p) for p in cfg["train"]["patch_size"]],
        "overlap": float(cfg["train"]["overlap"]),
        "head": head.to_dict(),
        "postprocess": rules_to_dict(rules or {}),
    }


def log_model(
    net: torch.nn.Module,
    *,
    spec: PreprocessSpec,
    cfg: Mapping[str, Any],
    name: str,
    head: Head | None = None,
    rules: Mapping[str, Rule] | None = None,
    domain: Mapping[str, Any] | None = None,
    card: str = "",
) -> Any:
    """Log ``net`` in the active run as a pickle-free pyfunc model and register it as ``name``.

    The weights go to ``weights.npz`` and the architecture, preprocessing, head and post-processing to
    ``model.json`` (:mod:`pacsai.learning.modelio`, also the pyfunc ``loader_module``); ``metadata["pacsai"]``
    repeats them with the training domain and the experiment config. Explicit ``pip_requirements`` (inferring
    them costs seconds) and a signature with dynamic batch and spatial sizes.
    """
    import mlflow.pyfunc

    from pacsai.learning.modelio import save_model_dir

    head = head or Head(kind="sigmoid", structures=spec.structures)
    config = model_config(cfg, spec=spec, head=head, rules=rules)
    experiment = json.loads(json.dumps({k: v for k, v in cfg.items() if k not in ("settings",)}, default=str))
    meta = {"pacsai": {**config, "domain": dict(domain or {}), "experiment": experiment}}
    with tempfile.TemporaryDirectory(prefix="pacsai-model-") as tmp:
        model_dir = save_model_dir(net, config, tmp)
        if card:
            (model_dir / "model_card.md").write_text(card)
        return mlflow.pyfunc.log_model(
            name="model",
            loader_module="pacsai.learning.modelio",
            data_path=str(model_dir),
            pip_requirements=_model_pip_requirements(),
            signature=_signature(head.channels),
            metadata=meta,
            registered_model_name=name,
        )
