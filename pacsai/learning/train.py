"""Training loop: cohort from the PACS → MONAI network, tracked in MLflow, registered in the model registry.

One call, :func:`train`, does what ``pacsai train EXPERIMENT.yaml`` does: select the cohort, split it by patient
(recorded as ``split.json``), preprocess (cached), train with DiceCE loss and AdamW (AMP on CUDA), validate
every ``val_every`` epochs (``val_dice_<structure>`` and ``val_dice_mean``), keep the best checkpoint, then log the
best model with its preprocessing spec and register it under ``model.name``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) it initialises a process group (NCCL on GPUs, Gloo otherwise), shards the
training patches with a ``DistributedSampler`` and wraps the network in DDP; only rank 0 validates and talks to
MLflow.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pacsai.errors import ConfigError, PacsaiWarning, TrackingError
from pacsai.learning.dataset import Case, PreprocessSpec, load_cases, training_dataset
from pacsai.learning.networks import build_network, divisor

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "split": {"seed": 0, "val": 0.2, "test": 0.2},
    "preprocess": {"spacing_mm": [4.0, 4.0, 4.0], "window": [-1000.0, 500.0], "margin_mm": 8.0},
    "model": {"architecture": "UNet"},
    "train": {
        "epochs": 20,
        "batch_size": 2,
        "patch_size": [64, 64, 64],
        "samples_per_case": 2,
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
    return cfg


def preprocess_spec(cfg: Mapping[str, Any]) -> PreprocessSpec:
    pp = cfg["preprocess"]
    return PreprocessSpec(
        spacing_mm=tuple(pp["spacing_mm"]),
        window=tuple(pp["window"]),
        structures=tuple(cfg["structures"]),
        body_threshold_hu=float(pp.get("body_threshold_hu", -500.0)),
        margin_mm=float(pp.get("margin_mm", 8.0)),
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


@dataclass(frozen=True)
class _Dist:
    world: int
    rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(world, dist.get_rank(), device)


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
    return head.probabilities(logits.float())[0].cpu().numpy()


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


def train(
    experiment: str | Path | Mapping[str, Any],
    *,
    pacs: Any = None,
    overrides: Mapping[str, Any] | None = None,
    smoke: bool = False,
    resume: str | Path | None = None,
    settings: Any = None,
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
    from pacsai.cohort import CohortQuery, select_cohort
    from pacsai.config import load_settings

    settings = settings or load_settings()
    cfg = load_experiment(experiment, overrides=overrides, smoke=smoke)
    dist = _distributed()
    tcfg = cfg["train"]
    seed = int(tcfg["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    from monai.utils import set_determinism

    set_determinism(seed=seed)

    if pacs is None or isinstance(pacs, str):
        from pacsai.pacs import connect

        pacs = connect(pacs or (cfg.get("pacs") or {}).get("url"), settings=settings)
    query = CohortQuery.from_config(cfg.get("cohort") or {}, structures=cfg["structures"])
    cohort = select_cohort(pacs, query, progress=progress and dist.main)
    split = cohort.split(
        seed=int(cfg["split"]["seed"]), fractions={k: cfg["split"][k] for k in ("val", "test")}
    )
    spec = preprocess_spec(cfg)
    cache_dir = Path(settings.cache_dir).parent / "preprocessed"
    train_cases = load_cases(
        pacs, cohort, spec, cache_dir=cache_dir, patients=split["train"], progress=progress
    )
    val_patients = split["val"] or split["train"]  # two patients: validate on training data (smoke only)
    val_cases = load_cases(pacs, cohort, spec, cache_dir=cache_dir, patients=val_patients, progress=False)

    kind = str(cfg["model"].get("output", "softmax"))
    if kind not in ("softmax", "sigmoid"):
        raise ConfigError(f"model.output {kind!r} must be softmax or sigmoid")
    head = Head(kind=kind, structures=spec.structures, contains=containment(train_cases, spec.structures))
    net = build_network(cfg["model"], in_channels=1, out_channels=head.channels).to(dist.device)
    optimiser = torch.optim.AdamW(
        net.parameters(), lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"])
    )
    epochs = int(tcfg["epochs"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, epochs))
    scaler = torch.amp.GradScaler("cuda", enabled=dist.device.type == "cuda")
    start_epoch, best, best_epoch, run_id = 0, -1.0, -1, None
    if resume is not None:
        state = torch.load(resume, map_location=dist.device, weights_only=False)
        net.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, best_epoch, run_id = (
            state["epoch"] + 1,
            state["best"],
            state["best_epoch"],
            state["run_id"],
        )
        if state.get("cohort_hash") not in (None, cohort.content_hash):
            warnings.warn(
                f"resuming from {resume}: the cohort changed since that checkpoint (hash "
                f"{state['cohort_hash'][:12]} → {cohort.content_hash[:12]}); the run now trains on other data",
                PacsaiWarning,
                stacklevel=2,
            )
        logger.info("resuming run %s at epoch %d from %s", run_id, start_epoch, resume)
    model = net
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )

    from monai.data import DataLoader
    from monai.losses import DiceCELoss

    dataset = training_dataset(
        train_cases, patch_size=tcfg["patch_size"], samples_per_case=int(tcfg["samples_per_case"]), seed=seed
    )
    sampler = None
    if dist.world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(
            dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=seed
        )
    loader = DataLoader(
        dataset,
        batch_size=max(1, int(tcfg["batch_size"]) // int(tcfg["samples_per_case"])),
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=int(tcfg.get("num_workers", 0)),
        generator=torch.Generator().manual_seed(seed),
    )
    loss_fn = DiceCELoss(
        sigmoid=kind == "sigmoid",
        softmax=kind == "softmax",
        to_onehot_y=kind == "softmax",
        lambda_dice=float(tcfg["lambda_dice"]),
        lambda_ce=float(tcfg["lambda_ce"]),
        smooth_nr=1e-5,
    )
    ckpt_dir = Path(settings.cache_dir).parent / "checkpoints"
    params = flat_params({k: v for k, v in cfg.items() if k not in ("settings", "pacs")})

    run_cm: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if dist.main:
        run_cm = tracking.start_run(
            "training",
            experiment=str(cfg["name"]),
            cohort=cohort if run_id is None else None,
            params=params if run_id is None else None,
            run_id=run_id,
            settings=settings,
            tags={"pacsai.model_name": str(cfg["model"]["name"]), "pacsai.smoke": str(bool(smoke)).lower()},
        )
    started = time.perf_counter()
    with run_cm as ctx:
        import mlflow

        # a resumed run keeps writing next to the checkpoint it came from (best.pt lives there)
        run_dir = (
            Path(resume).parent
            if resume is not None
            else ckpt_dir / (ctx.run_id if ctx is not None else f"rank{dist.rank}")
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        if ctx is not None and run_id is None:
            mlflow.log_dict(_split_record(split, cohort, ctx, seed=int(cfg["split"]["seed"])), "split.json")
            mlflow.log_dict(
                {c.series_instance_uid: list(c.sop_instance_uids) for c in [*train_cases, *val_cases]},
                "inputs/instances.json",
            )
            mlflow.log_dict({**spec.to_dict(), "head": head.to_dict()}, "preprocess.json")
        bar = tqdm(
            range(start_epoch, epochs), desc="train", unit="epoch", disable=not (progress and dist.main)
        )
        last_dice = "-"
        for epoch in bar:
            if sampler is not None:
                sampler.set_epoch(epoch)
            model.train()
            losses = []
            for batch in loader:
                x = batch["image"].to(dist.device)
                y = head.target(batch["label"].to(dist.device))
                optimiser.zero_grad(set_to_none=True)
                with _autocast(dist.device):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
                losses.append(float(loss.detach()))
            scheduler.step()
            train_loss = float(np.mean(losses)) if losses else float("nan")
            if not dist.main:
                continue
            metrics = {"train_loss": train_loss, "lr": float(scheduler.get_last_lr()[0])}
            is_last = epoch == epochs - 1
            if (epoch + 1) % int(tcfg["val_every"]) == 0 or is_last:
                dice = validate_cases(
                    net,
                    val_cases,
                    patch_size=tcfg["patch_size"],
                    device=dist.device,
                    overlap=float(tcfg["overlap"]),
                    head=head,
                )
                metrics.update({f"val_dice_{s}": float(d) for s, d in zip(spec.structures, dice)})
                metrics["val_dice_mean"] = float(np.mean(dice))
                if metrics["val_dice_mean"] > best:
                    best, best_epoch = metrics["val_dice_mean"], epoch
                    torch.save({"model": net.state_dict(), "epoch": epoch}, run_dir / "best.pt")
            mlflow.log_metrics(metrics, step=epoch)
            if callback is not None:
                callback(epoch, metrics)
            if "val_dice_mean" in metrics:  # validation runs every val_every epochs: show the latest, never "nan"
                last_dice = f"{metrics['val_dice_mean']:.3f}"
            bar.set_postfix(loss=f"{train_loss:.3f}", val_dice=last_dice)
            torch.save(
                {
                    "model": net.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "best": best,
                    "best_epoch": best_epoch,
                    "run_id": ctx.run_id,
                    "cohort_hash": cohort.content_hash,
                    "config": cfg,
                },
                run_dir / "last.pt",
            )
        seconds = time.perf_counter() - started
        if not dist.main:
            return TrainResult("", "", "", "", best_epoch, {}, epochs, seconds, run_dir / "last.pt", split)
        if not (run_dir / "best.pt").is_file():
            raise TrackingError(f"no checkpoint in {run_dir}: training ran no epoch (epochs={epochs})")
        net.load_state_dict(torch.load(run_dir / "best.pt", map_location=dist.device)["model"])
        best_dice = validate_cases(
            net,
            val_cases,
            patch_size=tcfg["patch_size"],
            device=dist.device,
            overlap=float(tcfg["overlap"]),
            head=head,
        )
        best_val = {s: float(d) for s, d in zip(spec.structures, best_dice)}
        mlflow.log_metrics(
            {
                "best_val_dice_mean": float(np.mean(best_dice)),
                "best_epoch": best_epoch,
                "train_seconds": seconds,
            }
        )
        mlflow.log_artifact(str(run_dir / "best.pt"), artifact_path="checkpoints")
        info = log_model(net.cpu(), spec=spec, cfg=cfg, name=str(cfg["model"]["name"]), head=head)
        version = str(info.registered_model_version)
        mlflow.set_tag("pacsai.model_version", version)
        return TrainResult(
            run_id=ctx.run_id,
            model_name=str(cfg["model"]["name"]),
            version=version,
            model_uri=f"models:/{cfg['model']['name']}/{version}",
            best_epoch=best_epoch,
            best_val_dice=best_val,
            epochs=epochs,
            seconds=seconds,
            checkpoint=run_dir / "best.pt",
            split={k: [ctx.patient_label(p) for p in v] for k, v in split.items()},
        )


def _split_record(split: Mapping[str, list[str]], cohort: Any, ctx: Any, *, seed: int) -> dict[str, Any]:
    """The split as an artifact: pseudonymised patients and the image series of each part."""
    table = cohort.table
    out: dict[str, Any] = {"seed": seed, "patients": {}, "series": {}}
    for part, patients in split.items():
        out["patients"][part] = [ctx.patient_label(p) for p in patients]
        out["series"][part] = sorted(table[table["patient_id"].isin(set(patients))]["series_instance_uid"])
    return out


def log_model(
    net: torch.nn.Module, *, spec: PreprocessSpec, cfg: Mapping[str, Any], name: str, head: Head | None = None
) -> Any:
    """Log ``net`` with its preprocessing spec in the active run and register it as ``name``.

    Explicit ``pip_requirements`` (inferring them costs seconds) and a signature with dynamic batch and
    spatial sizes. ``metadata["pacsai"]`` holds what :func:`pacsai.learning.infer.segment` needs.
    """
    import mlflow.pytorch

    meta = {
        "pacsai": {
            "preprocess": spec.to_dict(),
            "patch_size": [int(p) for p in cfg["train"]["patch_size"]],
            "overlap": float(cfg["train"]["overlap"]),
            "architecture": cfg["model"].get("architecture", "UNet"),
            "head": (head or Head(kind="sigmoid", structures=spec.structures)).to_dict(),
        }
    }
    channels = (head or Head(kind="sigmoid", structures=spec.structures)).channels
    return mlflow.pytorch.log_model(
        net.eval(),
        name="model",
        pip_requirements=_model_pip_requirements(),
        signature=_signature(channels),
        metadata=meta,
        registered_model_name=name,
        # "pt2" (torch.export) would need an input example and fixed stride constraints on every dynamic
        # dimension; a pickled module keeps any batch and window size. Load only models from a trusted store.
        serialization_format="pickle",
    )
