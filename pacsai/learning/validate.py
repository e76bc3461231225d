"""Validate a registered model by running the validation notebook with papermill; promote it on a pass.

:func:`run_validation` executes ``notebooks/03_evaluate.ipynb`` of the installed project (never of the working
directory) with the ``pacsai`` kernel. The notebook evaluates the model on the held-out (``test``) patients of
its training run, logs an MLflow run with ``pacsai.kind=validation`` (metrics ``dice_<structure>``,
``hd95_<structure>``, ...) and writes its results to a JSON file; this module then attaches the executed
notebook to that run, checks the thresholds itself, and sets the alias ``champion`` only if all pass.

Thresholds: ``STRUCT=VALUE`` or ``dice_STRUCT=VALUE`` require Dice ≥ VALUE; ``hd95_STRUCT=VALUE`` and
``msd_STRUCT=VALUE`` require the distance (mm) ≤ VALUE; ``surface_dice_STRUCT=VALUE`` requires ≥ VALUE.
Without thresholds a model passes when every structure got a finite Dice.

Does not import torch (the notebook's kernel does).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacsai.errors import ConfigError, PacsaiError, TrackingError

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]
TEMPLATE = "03_evaluate.ipynb"
KERNEL = "pacsai"
LOWER_IS_BETTER = ("hd95", "msd")
HIGHER_IS_BETTER = ("dice", "surface_dice")


def template_path() -> Path:
    """The validation notebook of the installed project."""
    path = PROJECT_DIR / "notebooks" / TEMPLATE
    if not path.is_file():
        raise PacsaiError(
            f"validation template {path} is missing; reinstall pacsai from its source tree (pip install -e .)"
        )
    return path


def parse_thresholds(items: Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """``["Heart=0.85", "hd95_Heart=10"]`` → ``{"dice_Heart": 0.85, "hd95_Heart": 10.0}`` (metric names)."""
    pairs = items.items() if isinstance(items, Mapping) else (_split(i) for i in items)
    out: dict[str, float] = {}
    for key, value in pairs:
        metric = (
            key
            if key.startswith((*(f"{m}_" for m in LOWER_IS_BETTER), "dice_", "surface_dice_"))
            else f"dice_{key}"
        )
        try:
            out[metric] = float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"threshold {key}={value!r} is not a number") from err
    return out


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"threshold {item!r}: use STRUCT=VALUE (Dice) or hd95_STRUCT=MM")
    return key.strip(), value.strip()


def check_thresholds(metrics: Mapping[str, float], thresholds: Mapping[str, float]) -> list[str]:
    """The failed checks, as readable lines (empty list: all pass). A missing or NaN metric fails."""
    failures = []
    for metric, limit in thresholds.items():
        value = metrics.get(metric)
        lower = metric.startswith(tuple(f"{m}_" for m in LOWER_IS_BETTER))
        if value is None or not math.isfinite(float(value)):
            failures.append(
                f"{metric}: no value (structure not evaluated or empty), needs {'≤' if lower else '≥'} {limit}"
            )
        elif lower and float(value) > limit:
            failures.append(f"{metric} = {float(value):.3f} > {limit}")
        elif not lower and float(value) < limit:
            failures.append(f"{metric} = {float(value):.4f} < {limit}")
    if not thresholds:
        failures = [
            f"{k}: not finite" for k, v in metrics.items() if k.startswith("dice_") and not math.isfinite(v)
        ]
        if not any(k.startswith("dice_") for k in metrics):
            failures.append("no Dice was computed")
    return failures


@dataclass(frozen=True)
class ValidationResult:
    """The outcome of one validation."""

    model_uri: str
    name: str
    version: str
    run_id: str
    passed: bool
    metrics: Mapping[str, float]
    failures: list[str] = field(default_factory=list)
    notebook: Path | None = None
    alias_set: bool = False


def run_validation(
    model_uri: str,
    *,
    thresholds: Sequence[str] | Mapping[str, float] = (),
    smoke: bool = False,
    pacs_url: str | None = None,
    tolerance_mm: float = 2.0,
    output_dir: str | Path | None = None,
    promote: bool = True,
    kernel: str = KERNEL,
    settings: Any = None,
) -> ValidationResult:
    """Run the validation notebook on ``model_uri``; set ``champion`` if every threshold passes.

    Parameters
    ----------
    model_uri
        ``models:/name/3``, ``models:/name@alias`` or ``models:/name/latest``.
    thresholds
        See the module docstring.
    smoke
        Evaluate a single held-out case (tests, CI).
    pacs_url
        PACS holding the cohort; default the settings' PACS.
    tolerance_mm
        τ of the surface Dice.
    output_dir
        Where the executed notebook is kept; default a temporary folder (the notebook is in MLflow anyway).
    promote
        Set the alias ``champion`` on a pass (False: only report).
    kernel
        Jupyter kernel name (``make setup`` installs ``pacsai``).
    settings
        Settings; default :func:`pacsai.load_settings`.

    Returns
    -------
    ValidationResult
        ``passed`` False means nothing was promoted.

    Raises
    ------
    PacsaiError
        The notebook failed (the message names the executed notebook to read).
    """
    import papermill

    from pacsai import tracking
    from pacsai.pacs.credentials import credentials_out_of_url
    from pacsai.report.render import stderr_to

    limits = parse_thresholds(thresholds)
    ref = tracking.resolve_model(model_uri, settings=settings)
    if not ref.name:
        raise TrackingError(
            f"{model_uri} is not a registered model; validate models:/NAME/VERSION or models:/NAME@ALIAS"
        )
    pinned = ref.uri  # validate and promote exactly this version, even if an alias moves meanwhile
    keep = Path(output_dir) if output_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="pacsai-validate-") as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        out_nb = folder / f"validation-{ref.name}-v{ref.version}.ipynb"
        result_path = folder / f"validation-{ref.name}-v{ref.version}.json"
        params = {
            "model_uri": pinned,
            "pacs_url": pacs_url or "",  # credentials in it move to the environment below
            "tracking_uri": tracking.tracking_uri(settings=settings),
            "thresholds": limits,
            "tolerance_mm": float(tolerance_mm),
            "smoke": bool(smoke),
            "result_path": str(result_path),
        }
        logger.info("validating %s with %s", pinned, template_path())
        try:
            # The executed notebook becomes an MLflow artifact: a user:password@ URL must not reach it, and the
            # kernel's start-up chatter goes to a log file next to it rather than the user's terminal.
            with credentials_out_of_url(params["pacs_url"]) as url, stderr_to(out_nb.with_suffix(".log")):
                papermill.execute_notebook(
                    str(template_path()),
                    str(out_nb),
                    parameters={**params, "pacs_url": url},
                    kernel_name=kernel,
                    cwd=os.getcwd(),
                    progress_bar=False,
                    log_output=False,
                )
        except papermill.PapermillExecutionError as err:
            raise PacsaiError(
                f"validation notebook failed for {pinned}: {err.ename}: {err.evalue} (executed notebook: {out_nb}; "
                "pass an output folder to keep it)"
            ) from err
        except Exception as err:  # kernel missing, papermill errors
            if "No such kernel" in str(err) or "kernel" in type(err).__name__.lower():
                raise PacsaiError(
                    f"Jupyter kernel {kernel!r} not found: run `make setup` (python -m ipykernel install "
                    f"--sys-prefix --name {kernel})"
                ) from err
            raise
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError) as err:
            raise PacsaiError(
                f"validation notebook {out_nb} wrote no readable result {result_path}: {err}"
            ) from err
        run_id = str(result["run_id"])
        metrics = {k: float(v) for k, v in result["metrics"].items()}
        c = tracking.client(settings=settings)
        c.log_artifact(run_id, str(out_nb), artifact_path="notebook")
        failures = check_thresholds(metrics, limits)
        passed = not failures
        c.set_tag(run_id, "pacsai.passed", str(passed).lower())
        alias_set = False
        if passed and promote:
            tracking.set_alias(ref.name, ref.version, tracking.CHAMPION, settings=settings)
            c.set_tag(run_id, "pacsai.promoted", tracking.CHAMPION)
            alias_set = True
        return ValidationResult(
            model_uri=pinned,
            name=ref.name,
            version=ref.version,
            run_id=run_id,
            passed=passed,
            metrics=metrics,
            failures=failures,
            notebook=out_nb if keep is not None else None,
            alias_set=alias_set,
        )
