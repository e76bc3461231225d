"""The demo, the main job on a fresh clone: seed a PACS, train, validate, report one patient, push back.

Re-running reuses what is there: seeding is idempotent, a model that already holds the alias ``champion`` is
not trained again (``retrain=True`` forces it), and re-pushing the same report adds nothing to the PACS.
The ``pacsai demo`` verb (:mod:`pacsai.commands.demo`) parses the options and prints the result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsai.errors import ConfigError, PacsaiError

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs.base import Pacs
    from pacsai.report.run import ReportResult

#: The demo experiment ships in the package (``experiments/demo.yaml`` of the source tree links to it), so the
#: demo runs from any working folder and from a wheel.
DEMO_EXPERIMENT = "templates/demo.yaml"
# The report patient is seeded after training, from seeds the training cohort never saw, with a prior study.
REPORT_SEED = 900
SUMMARY_FILE = "reports/demo_summary.json"


@dataclass(frozen=True)
class DemoResult:
    """What one demo run produced: the report, the model it used and the run's own figures."""

    report: ReportResult
    pacs_url: str
    model: str
    qa: dict[str, Any]
    stages: dict[str, float] = field(default_factory=dict)
    held_out: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    summary: Path | None = None


def default_experiment() -> Path:
    """Path of the demo experiment shipped in the package (``pacsai/templates/demo.yaml``).

    Raises
    ------
    ConfigError
        The installed package lacks it (a wheel built without its package data).
    """
    resource = resources.files("pacsai").joinpath(DEMO_EXPERIMENT)
    if not resource.is_file():
        raise ConfigError(f"the demo experiment is missing from the installed package ({resource}); reinstall "
                          "pacsai (its wheel ships pacsai/templates/*.yaml) or give --experiment FILE")
    return Path(str(resource))


def run_demo(
    *,
    experiment: Path | None = None,
    pacs_url: str | None = None,
    retrain: bool = False,
    smoke: bool = False,
    started_at: float | None = None,
    summary: Path | None = Path(SUMMARY_FILE),
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Seed, train and validate unless a champion exists, then report one new patient and push the outputs.

    Parameters
    ----------
    experiment
        Experiment YAML; None means the packaged demo experiment (:func:`default_experiment`).
    pacs_url
        PACS to use; None means ``PACSAI_PACS_URL``, else the embedded store ``./pacs``.
    retrain
        Train even when the model already holds the alias ``champion``.
    smoke
        Tiny sizes (tests, CI); a smoke model is not expected to pass the validation gate.
    started_at
        Epoch seconds when ``make demo`` began, so the summary counts the set-up too.
    summary
        Where to write the run's figures as JSON (:func:`write_summary`); None writes none.
    echo
        Receives one line per step as the demo goes (the verb prints them).
    """
    import yaml

    from pacsai.pacs import connect
    from pacsai.synthetic import seed_pacs

    start = time.perf_counter()
    experiment = Path(experiment) if experiment is not None else default_experiment()
    cfg = yaml.safe_load(experiment.read_text())
    syn = dict(cfg.get("synthetic") or {})
    z, y, x = (int(v) for v in syn.get("shape", (40, 160, 160)))
    sx, sy, sz = (float(v) for v in syn.get("spacing", (2.5, 2.5, 4.0)))
    shape, spacing = (z, y, x), (sx, sy, sz)
    n_patients = 3 if smoke else int(syn.get("patients", 12))
    pacs = connect(pacs_url)

    stages: dict[str, float] = {}
    t = _step(echo, f"seeding {n_patients} synthetic patients into {pacs.url}")
    seed_pacs(pacs, patients=n_patients, seed=int(syn.get("seed", 0)), with_prior=bool(syn.get("with_prior")),
              shape=shape, spacing=spacing, progress=True)
    stages["seeding"] = time.perf_counter() - t
    echo(f"    {stages['seeding']:.0f} s")

    report_model, held_out = _model_for_report(experiment, cfg["model"]["name"], pacs, retrain=retrain,
                                               smoke=smoke, stages=stages, echo=echo)

    t = _step(echo, "seeding the report patient (with a prior study) and writing the planning report")
    report = _report_one_patient(pacs, report_model, shape=shape, spacing=spacing, smoke=smoke)
    stages["report"] = time.perf_counter() - t
    echo(f"    {stages['report']:.0f} s")
    qa = json.loads(Path(report.metrics).read_text()).get("qa") or {}
    total = time.perf_counter() - start
    if started_at is not None:
        stages = {"setup": max(0.0, time.time() - total - started_at), **stages}
    if summary is not None:
        write_summary(summary, stages=stages, held_out=held_out, qa=str(qa.get("status", "?")),
                      model=report_model, smoke=smoke,
                      structures=list(cfg.get("structures") or []))
    return DemoResult(report=report, pacs_url=str(pacs.url), model=report_model, qa=qa, stages=stages,
                      held_out=held_out, seconds=total, summary=summary)


def _step(echo: Callable[[str], None], text: str) -> float:
    echo(f"==> {text}")
    return time.perf_counter()


def _model_for_report(experiment: Path, model_name: str, pacs: Pacs, *, retrain: bool, smoke: bool,
                      stages: dict[str, float], echo: Callable[[str], None]) -> tuple[str, dict[str, float]]:
    """The model URI the report uses, training and validating first unless a champion exists already.

    Returns the URI and the held-out metrics of the validation (empty when an existing champion is reused).
    """
    from pacsai import tracking

    champion = tracking.get_alias(model_name)
    if champion is not None and not retrain and not smoke:
        echo(f"==> reusing {model_name} v{champion} (alias champion); --retrain trains again")
        return f"models:/{model_name}@champion", {}

    from pacsai.learning.train import train
    from pacsai.learning.validate import run_validation

    t = _step(echo, f"training {experiment} (MLflow: {tracking.tracking_uri()})")
    result = train(experiment, pacs=pacs, smoke=smoke)
    stages["training"] = time.perf_counter() - t
    echo(f"    {result.model_uri} (run {result.run_id}), best epoch {result.best_epoch}, "
         f"{result.seconds:.0f} s in the training loop, {stages['training']:.0f} s in all")
    t = _step(echo, f"validating {result.model_uri} by papermill (thresholds: the experiment's validation block)")
    validation = run_validation(result.model_uri, smoke=smoke, pacs_url=str(pacs.url))
    stages["validation"] = time.perf_counter() - t
    held_out = {k: float(v) for k, v in validation.metrics.items() if k.startswith(("dice_", "hd95_"))}
    for metric in ("dice", "hd95"):
        values = ", ".join(f"{k.removeprefix(metric + '_')} {v:.3g}"
                           for k, v in sorted(validation.metrics.items()) if k.startswith(metric + "_"))
        echo(f"    held-out {metric}: {values}")
    report_model = f"models:/{model_name}@champion"
    if validation.passed:
        echo(f"    alias champion → {model_name} v{validation.version}")
    elif not smoke:
        raise PacsaiError(f"the demo model failed validation ({'; '.join(validation.failures)}); "
                          f"see {validation.notebook}")
    else:
        # a 2-epoch smoke model cannot pass the real gate; the smoke run still exercises the report with it
        echo(f"    smoke model not promoted ({len(validation.failures)} gate failures, as expected)")
        report_model = result.model_uri
    echo(f"    {stages['validation']:.0f} s")
    return report_model, held_out


def _report_one_patient(pacs: Pacs, model_uri: str, *, shape: tuple[int, int, int],
                        spacing: tuple[float, float, float], smoke: bool) -> ReportResult:
    """Seed the report patient (seeds the training cohort never saw, with a prior study) and report it."""
    from pacsai.report.params import validate_parameters
    from pacsai.report.run import run_report
    from pacsai.synthetic import seed_pacs

    seeded = seed_pacs(pacs, patients=1, seed=REPORT_SEED, with_prior=True, shape=shape, spacing=spacing,
                       progress=False)
    params = validate_parameters(patient_id=seeded[0].patient_id, pacs_url=str(pacs.url), structures_from="model",
                                 model_uri=model_uri, smoke=smoke)
    return run_report(params, push=True)


def write_summary(path: Path, *, stages: dict[str, float], held_out: dict[str, float], qa: str, model: str,
                  smoke: bool, structures: list[str]) -> None:
    """The run's own figures (stages, held-out metrics, QA status), stamped with the commit and machine.

    The README's demo figures are generated from this file (scripts/readme_figures.py), never typed by hand.
    No patient identifier goes in: the figures are about the model and the machine. The commit is the one of
    the code that ran (the source tree of this package; none for an installed wheel).
    """
    import datetime as dt
    import math
    import os
    import platform
    import subprocess

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    doc = {
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "git": commit,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "system": platform.system()},
        "smoke": smoke,
        "stages_s": {k: round(v, 1) for k, v in stages.items()},
        "total_s": round(sum(stages.values()), 1),
        "structures": structures,
        # NaN (a structure the model never found) is not JSON: it is written as null.
        "held_out": {k: round(v, 4) if math.isfinite(v) else None for k, v in sorted(held_out.items())},
        "qa_status": qa,
        "model": model,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
