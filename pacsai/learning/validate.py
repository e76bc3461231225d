"""Validate a registered model by running the validation notebook with papermill; promote it on a pass.

:func:`run_validation` executes the validation template shipped in the package (``pacsai/templates/
03_evaluate.ipynb``, also ``notebooks/03_evaluate.ipynb`` in the source tree) with the ``pacsai`` kernel, by
:mod:`pacsai.notebooks`. The notebook evaluates the model on the held-out (``test``) patients of
its training run, with the plan dose where the study has one (:func:`pacsai.learning.evaluate.
dose_aware_agreement`), logs an MLflow run with ``pacsai.kind=validation`` (metrics ``dice_<S>``, ``hd95_<S>``,
``surface_dice_<S>``, ``apl_<S>``, ``delta_dmean_<S>``, ``delta_d0_03cc_<S>``, ``delta_v20_<S>`` and the worst
per-patient ``abs_delta_*_<S>``) and writes its results to a JSON file; this module then attaches the executed
notebook to that run, checks the promotion gate itself, writes the gate's numbers onto the model version
(:func:`pacsai.tracking.record_validation`) and sets the alias ``champion`` only if the gate passes.

The gate covers every structure the model outputs: a structure without a threshold fails it, as does a limit
that could not be checked (structure empty or missing in a held-out case, no plan dose for a dose limit).

Thresholds, per structure (the experiment YAML's ``validation.thresholds`` block, stored with the model)::

    Lung_L: {dice: 0.97, hd95: 5.0, delta_dmean_gy: 1.0}

``dice`` and ``surface_dice`` are minima (mean over the held-out patients); ``hd95``, ``msd`` and ``apl_mm``
maxima in mm (mean); ``delta_dmean_gy``, ``delta_d0_03cc_gy`` and ``delta_v20_pct`` maxima of |model − reference|
in the worst held-out patient. On the command line: ``STRUCT=VALUE`` or ``dice_STRUCT=VALUE`` (Dice ≥),
``hd95_STRUCT=MM``, ``msd_STRUCT=MM``, ``apl_STRUCT=MM``, ``surface_dice_STRUCT=F``, ``delta_dmean_STRUCT=GY``,
``delta_d0_03cc_STRUCT=GY``, ``delta_v20_STRUCT=PCT``.

Does not import torch (the notebook's kernel does).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsai import notebooks
from pacsai.errors import ConfigError, PacsaiError, TrackingError
from pacsai.notebooks import KERNEL, VALIDATION_TEMPLATE

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.config import Settings

logger = logging.getLogger(__name__)

TEMPLATE = VALIDATION_TEMPLATE
LOWER_IS_BETTER = ("hd95", "msd", "apl", "abs_delta_dmean", "abs_delta_d0_03cc", "abs_delta_v20")
HIGHER_IS_BETTER = ("dice", "surface_dice")
# key of a structure's entry in the YAML block → the metric prefix it limits
LIMIT_KEYS = {
    "dice": "dice",
    "surface_dice": "surface_dice",
    "hd95": "hd95",
    "msd": "msd",
    "apl_mm": "apl",
    "delta_dmean_gy": "abs_delta_dmean",
    "delta_d0_03cc_gy": "abs_delta_d0_03cc",
    "delta_v20_pct": "abs_delta_v20",
}
# command-line prefix → metric prefix; a dose limit is on |Δ| in the worst patient, whichever way it is written
_CLI_PREFIXES = {
    **{f"{p}_": p for p in (*HIGHER_IS_BETTER, *LOWER_IS_BETTER)},
    "delta_dmean_": "abs_delta_dmean",
    "delta_d0_03cc_": "abs_delta_d0_03cc",
    "delta_v20_": "abs_delta_v20",
}
_UNITS = {"hd95": " mm", "msd": " mm", "apl": " mm", "abs_delta_dmean": " Gy", "abs_delta_d0_03cc": " Gy",
          "abs_delta_v20": " %"}


def template_path() -> Path:
    """The validation notebook shipped in the package (:func:`pacsai.notebooks.template`)."""
    return notebooks.template(TEMPLATE)


def split_metric(metric: str) -> tuple[str, str]:
    """``"abs_delta_dmean_Lung_L"`` → ``("abs_delta_dmean", "Lung_L")``; a bare name is a Dice limit."""
    for prefix in sorted(_CLI_PREFIXES, key=len, reverse=True):
        if metric.startswith(prefix) and len(metric) > len(prefix):
            return _CLI_PREFIXES[prefix], metric[len(prefix) :]
    return "dice", metric


def parse_thresholds(
    items: Sequence[str] | Mapping[str, float] | Mapping[str, Mapping[str, float]],
) -> dict[str, float]:
    """Thresholds in any accepted form → ``{metric name: limit}``.

    ``["Heart=0.85", "hd95_Heart=10", "delta_dmean_Heart=1"]``, the same as a mapping, or the YAML form
    ``{"Heart": {"dice": 0.85, "hd95": 10, "delta_dmean_gy": 1}}`` all give
    ``{"dice_Heart": 0.85, "hd95_Heart": 10.0, "abs_delta_dmean_Heart": 1.0}``.
    """
    if isinstance(items, Mapping):
        pairs: list[tuple[str, Any]] = []
        for key, value in items.items():
            if isinstance(value, Mapping):
                pairs += _structure_limits(str(key), value)
            else:
                pairs.append((str(key), value))
    else:
        pairs = [_split(i) for i in items]
    out: dict[str, float] = {}
    for key, value in pairs:
        prefix, structure = split_metric(key)
        try:
            limit = float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"threshold {key}={value!r} is not a number") from err
        if not math.isfinite(limit):
            raise ConfigError(f"threshold {key}={value!r} must be a finite number")
        out[f"{prefix}_{structure}"] = limit
    return out


def _structure_limits(structure: str, limits: Mapping[str, Any]) -> list[tuple[str, Any]]:
    unknown = sorted(set(limits) - set(LIMIT_KEYS))
    if unknown:
        raise ConfigError(
            f"validation threshold of {structure}: unknown {unknown}; use {', '.join(LIMIT_KEYS)}"
        )
    return [(f"{LIMIT_KEYS[k]}_{structure}", v) for k, v in limits.items()]


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"threshold {item!r}: use STRUCT=VALUE (Dice) or hd95_STRUCT=MM")
    return key.strip(), value.strip()


def thresholds_from_experiment(config: Mapping[str, Any], *, source: str = "the experiment") -> dict[str, float]:
    """The ``validation.thresholds`` block of an experiment config → ``{metric: limit}``.

    Raises
    ------
    ConfigError
        The block is missing or malformed (the message names ``source``).
    """
    block = (config.get("validation") or {}).get("thresholds") if isinstance(config, Mapping) else None
    if not isinstance(block, Mapping) or not block:
        raise ConfigError(
            f"{source} has no validation.thresholds block; add one (see experiments/demo.yaml) or pass --threshold"
        )
    if not all(isinstance(v, Mapping) for v in block.values()):
        raise ConfigError(f"{source}: validation.thresholds maps each structure to {{metric: limit}}")
    return parse_thresholds(block)


def stored_thresholds(model_uri: str, *, settings: Settings | None = None) -> dict[str, float] | None:
    """The thresholds in the model's stored experiment config (``metadata["pacsai"]["experiment"]``), or None."""
    from pacsai import tracking

    tracking._mlflow()  # telemetry off before mlflow's first import
    from mlflow.models import get_model_info

    uri = tracking.tracking_uri(settings=settings)
    try:
        with tracking.using_store(uri):
            info = get_model_info(model_uri)
    except Exception as err:
        raise TrackingError(f"cannot read the metadata of {model_uri} from {uri}: {err}") from err
    experiment = ((info.metadata or {}).get("pacsai") or {}).get("experiment")
    if not isinstance(experiment, Mapping) or "validation" not in experiment:
        return None
    return thresholds_from_experiment(experiment, source=f"the experiment stored with {model_uri}")


def _direction(prefix: str) -> str:
    return "≤" if prefix in LOWER_IS_BETTER else "≥"


def gate_rows(
    metrics: Mapping[str, float],
    thresholds: Mapping[str, float],
    *,
    outputs: Sequence[str] | None = None,
    notes: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per limit (and per output without one): structure, metric, limit, value, passed, reason."""
    notes = notes or {}
    rows = []
    limited = {split_metric(m)[1] for m in thresholds}
    for structure in outputs or ():
        if structure not in limited:
            rows.append(
                {"structure": structure, "metric": "", "limit": "", "value": math.nan, "passed": False,
                 "reason": f"no threshold for {structure}: the gate must cover every output"}
            )
    for metric, limit in thresholds.items():
        prefix, structure = split_metric(metric)
        direction = _direction(prefix)
        raw = metrics.get(metric)
        value = float(raw) if raw is not None else math.nan
        text = f"{direction} {limit:g}{_UNITS.get(prefix, '')}"
        if outputs is not None and structure not in outputs:
            passed, reason = False, f"{metric}: the model does not output {structure}"
        elif not math.isfinite(value):
            why = notes.get(structure) or "not evaluated"
            passed, reason = False, f"{metric}: not evaluable ({why}), needs {text}"
        else:
            passed = value <= limit if direction == "≤" else value >= limit
            reason = "" if passed else f"{metric} = {value:.4g} {'>' if direction == '≤' else '<'} {limit:g}"
        rows.append(
            {"structure": structure, "metric": prefix, "limit": text, "value": value, "passed": passed,
             "reason": reason}
        )
    return rows


def check_thresholds(
    metrics: Mapping[str, float],
    thresholds: Mapping[str, float],
    *,
    outputs: Sequence[str] | None = None,
    notes: Mapping[str, str] | None = None,
) -> list[str]:
    """The failed checks of the promotion gate, as readable lines (empty list: the gate passes).

    Parameters
    ----------
    metrics
        Validation metrics by name (``dice_Heart`` ...); a missing or NaN metric fails its limit.
    thresholds
        ``{metric: limit}`` (:func:`parse_thresholds`).
    outputs
        The structures the model outputs: each needs at least one limit. ``None``: not checked.
    notes
        Per structure, why its metrics are NaN (``summarize``'s ``note``), quoted in the failure.
    """
    if not thresholds:
        return [f"no threshold for {s}: the gate must cover every output" for s in outputs or ()] or [
            "no thresholds: give the experiment a validation.thresholds block or pass --threshold"
        ]
    return [r["reason"] for r in gate_rows(metrics, thresholds, outputs=outputs, notes=notes) if not r["passed"]]


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
    thresholds: Mapping[str, float] = field(default_factory=dict)
    thresholds_source: str = ""
    outputs: tuple[str, ...] = ()
    gate: list[dict[str, Any]] = field(default_factory=list)


def resolve_thresholds(
    model_uri: str,
    thresholds: Sequence[str] | Mapping[str, Any] | None,
    *,
    experiment: str | Path | None = None,
    settings: Settings | None = None,
) -> tuple[dict[str, float], str]:
    """The gate's limits and where they came from: given, else stored with the model, else ``experiment``.

    An empty result is allowed: the gate then fails every output for want of a threshold.
    """
    if thresholds is not None:
        return parse_thresholds(thresholds), "given"
    stored = stored_thresholds(model_uri, settings=settings)
    if stored is not None:
        return stored, "the experiment stored with the model"
    if experiment is not None:
        import yaml

        path = Path(experiment)
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read the experiment {path}: {err}") from err
        return thresholds_from_experiment(config, source=str(path)), str(path)
    logger.warning("%s stores no experiment config and none was given: no thresholds", model_uri)
    return {}, "none"


def run_validation(
    model_uri: str,
    thresholds: Sequence[str] | Mapping[str, Any] | None = None,
    *,
    experiment: str | Path | None = None,
    smoke: bool = False,
    pacs_url: str | None = None,
    tolerance_mm: float = 2.0,
    output_dir: str | Path | None = None,
    promote: bool = True,
    kernel: str = KERNEL,
    settings: Settings | None = None,
) -> ValidationResult:
    """Run the validation notebook on ``model_uri``; set ``champion`` if the promotion gate passes.

    Parameters
    ----------
    model_uri
        ``models:/name/3``, ``models:/name@alias`` or ``models:/name/latest``.
    thresholds
        See the module docstring. ``None`` (default): the ``validation.thresholds`` of the experiment stored with
        the model (``metadata["pacsai"]["experiment"]``), else of ``experiment``.
    experiment
        Experiment YAML to take the thresholds from when the model stores none (models from before the
        experiment config was stored).
    smoke
        Evaluate a single held-out case (tests, CI).
    pacs_url
        PACS holding the cohort; default the settings' PACS.
    tolerance_mm
        τ of the surface Dice and the added path length.
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
        ``passed`` False means nothing was promoted; ``failures`` says why.

    Raises
    ------
    PacsaiError
        The notebook failed (the message names the executed notebook to read).
    """
    from pacsai import tracking

    ref = tracking.resolve_model(model_uri, settings=settings)
    if not ref.name:
        raise TrackingError(
            f"{model_uri} is not a registered model; validate models:/NAME/VERSION or models:/NAME@ALIAS"
        )
    pinned = ref.uri  # validate and promote exactly this version, even if an alias moves meanwhile
    limits, source = resolve_thresholds(pinned, thresholds, experiment=experiment, settings=settings)
    keep = Path(output_dir) if output_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="pacsai-validate-") as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        out_nb = folder / f"validation-{ref.name}-v{ref.version}.ipynb"
        result_path = folder / f"validation-{ref.name}-v{ref.version}.json"
        # The executed notebook becomes an MLflow artifact: a user:password@ URL must not reach it, so its login
        # goes to this kernel's own environment (pacsai.notebooks), as would PACSAI_PACS_PASSWORD from the user.
        url, secrets = notebooks.credentials_to_environment(pacs_url or "")
        params = {
            "model_uri": pinned,
            "pacs_url": url,
            "tracking_uri": tracking.tracking_uri(settings=settings),
            "thresholds": limits,
            "tolerance_mm": float(tolerance_mm),
            "smoke": bool(smoke),
            "result_path": str(result_path),
        }
        logger.info("validating %s with %s (thresholds: %s)", pinned, template_path(), source)
        env = notebooks.kernel_environment({**secrets, "PACSAI_RUN_SOURCE": TEMPLATE})
        try:
            # The kernel's start-up chatter goes to a log file next to the notebook, not the user's terminal.
            notebooks.execute(template_path(), out_nb, params, env=env, cwd=Path.cwd(), kernel=kernel)
        except notebooks.NotebookCellError as err:
            raise PacsaiError(
                f"validation notebook failed for {pinned}: {err.ename}: {err.evalue} (executed notebook: {out_nb}; "
                "pass an output folder to keep it)"
            ) from err
        except notebooks.NotebookError as err:  # kernel died, not installed, did not start
            raise PacsaiError(f"validation of {pinned}: {err}") from err
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError) as err:
            raise PacsaiError(
                f"validation notebook {out_nb} wrote no readable result {result_path}: {err}"
            ) from err
        run_id = str(result["run_id"])
        metrics = {k: float(v) for k, v in result["metrics"].items()}
        outputs = tuple(str(s) for s in result.get("outputs") or ())
        notes = {str(k): str(v) for k, v in (result.get("notes") or {}).items()}
        c = tracking.client(settings=settings)
        c.log_artifact(run_id, str(out_nb), artifact_path="notebook")
        rows = gate_rows(metrics, limits, outputs=outputs, notes=notes)
        failures = check_thresholds(metrics, limits, outputs=outputs, notes=notes)
        passed = not failures
        c.set_tag(run_id, "pacsai.passed", str(passed).lower())
        c.set_tag(run_id, "pacsai.thresholds_source", source)
        tracking.record_validation(
            ref.name,
            ref.version,
            run_id=run_id,
            passed=passed,
            rows=rows,
            failures=failures,
            notebook_artifact=f"notebook/{out_nb.name}",
            n_cases=int(result.get("n_patients") or 0),
            settings=settings,
        )
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
            thresholds=limits,
            thresholds_source=source,
            outputs=outputs,
            gate=rows,
        )
