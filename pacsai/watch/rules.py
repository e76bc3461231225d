"""The watch rules: which studies trigger a report, how it is made, whether it goes back to the PACS.

A rules file is YAML, validated on start (``extra="forbid"`` everywhere, so a misspelt key is an error that names
it, not a silently ignored setting)::

    triggers:                 # a study triggers when ANY trigger matches
      - name: planning-ct-with-dose
        modality: CT          # the study holds a series of this modality ...
        with: [RTDOSE]        # ... and one of each of these
      - name: planning-ct-with-prior
        modality: CT
        prior: true           # ... and the patient has an earlier study holding a `modality` series
    report:                   # the report's parameters (pacsai.report.params.ReportParameters)
      structures_from: model  # pacs | model
      model: models:/pacsai-thorax@champion   # the alias is resolved at each report
      constraint_set: thorax
    push: true
    push_anyway: false        # store contours and SR even on a QA FAIL (the SR then says so)
    stable_seconds: 10        # a study is reported once nothing arrived for it for this long
    retry: {max_attempts: 3, backoff_seconds: 30, max_backoff_seconds: 900}

The studies pacsai itself writes (SEG, RTSTRUCT, SR, PDF in series 900-903, :func:`is_pacsai_output`) never
count: neither for a trigger nor as a change of the study.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pacsai.errors import ConfigError

#: SeriesNumbers of the report's outputs (pacsai.report.outputs): SEG, RTSTRUCT, SR, PDF.
OUTPUT_SERIES_NUMBERS = frozenset({900, 901, 902, 903})
OUTPUT_MODALITIES = frozenset({"SEG", "RTSTRUCT", "SR", "DOC"})


class Trigger(BaseModel):
    """One condition a study can meet to be reported."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field("trigger", min_length=1)
    modality: str = Field("CT", min_length=1, description="the study holds a series of this modality")
    with_: tuple[str, ...] = Field((), alias="with", description="and a series of each of these modalities")
    prior: bool = Field(False, description="and the patient has an earlier study holding a `modality` series")
    study_description: str | None = Field(None, description="glob on StudyDescription (case-insensitive)")


class ReportSettings(BaseModel):
    """The report's parameters that do not depend on the study (see ReportParameters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    structures_from: Literal["pacs", "model"] = "pacs"
    model: str = Field("", description="model URI; an alias (models:/name@champion) is resolved at each report")
    target: str = "GTV"
    ctv_margin_mm: float | tuple[float, float, float] = 5.0
    ptv_margin_mm: float | tuple[float, float, float] = 5.0
    constraint_set: str = "thorax"
    prescription_gy: float = Field(60.0, gt=0)
    fractions: int = Field(30, gt=0)
    pdf: bool = Field(True, description="render the PDF (Chromium); it is the object that shows a QA FAIL")
    track: bool = Field(True, description="log an MLflow run per report")
    smoke: bool = Field(False, description="tiny sizes (tests)")

    @model_validator(mode="after")
    def _model_needs_uri(self) -> ReportSettings:
        if self.structures_from == "model" and not self.model:
            raise ValueError("structures_from: model needs model: (e.g. models:/pacsai-thorax@champion)")
        return self

    def parameters(self, *, patient_id: str, study_uid: str, pacs_url: str, model_uri: str | None = None) -> Any:
        """The :class:`~pacsai.report.params.ReportParameters` of one study (``model_uri`` overrides ``model``)."""
        from pacsai.report.params import validate_parameters

        return validate_parameters(
            patient_id=patient_id, study_uid=study_uid, pacs_url=pacs_url,
            structures_from=self.structures_from,
            model_uri=(model_uri or self.model) if self.structures_from == "model" else "",
            target=self.target, ctv_margin_mm=self.ctv_margin_mm, ptv_margin_mm=self.ptv_margin_mm,
            constraint_set=self.constraint_set, prescription_gy=self.prescription_gy, fractions=self.fractions,
            smoke=self.smoke,
        )


class Retry(BaseModel):
    """Failed reports are retried after ``backoff_seconds`` × 2^(attempt-1) (capped), at most ``max_attempts``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(3, ge=1)
    backoff_seconds: float = Field(30.0, ge=0)
    max_backoff_seconds: float = Field(900.0, ge=0)

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure."""
        return float(min(self.max_backoff_seconds, self.backoff_seconds * 2 ** max(0, attempts - 1)))


class WatchRules(BaseModel):
    """A whole rules file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    triggers: tuple[Trigger, ...] = Field(
        (Trigger(name="planning-ct-with-dose", modality="CT", with_=("RTDOSE",)),), min_length=1
    )
    report: ReportSettings = ReportSettings()
    push: bool = True
    push_anyway: bool = False
    stable_seconds: float = Field(10.0, ge=0, description="quiet time before a study counts as complete")
    poll_seconds: float = Field(2.0, gt=0, description="how often the PACS is asked for changes")
    backfill: bool = Field(False, description="on the first start, report the studies already in the PACS too")
    retry: Retry = Retry()
    qido_filters: dict[str, str] = Field(default_factory=dict, description="study filters for QIDO polling")

    @model_validator(mode="after")
    def _push_anyway_needs_push(self) -> WatchRules:
        if self.push_anyway and not self.push:
            raise ValueError("push_anyway: true needs push: true")
        return self


def _location(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_rules(doc: Mapping[str, Any] | None, *, source: str = "rules") -> WatchRules:
    """Validate a rules mapping; a :class:`ConfigError` names every bad key and why."""
    try:
        return WatchRules.model_validate(dict(doc or {}))
    except ValidationError as err:
        problems = []
        for e in err.errors():
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown key {_location(e['loc'])!r}")
            else:
                problems.append(f"{_location(e['loc'])}: {e['msg']}")
        raise ConfigError(f"invalid watch rules in {source}: {'; '.join(problems)}; see docs/watch.md") from err


def load_rules(path: str | Path | None) -> WatchRules:
    """Read and validate a rules YAML file (``None``: the defaults, a CT with an RTDOSE, structures from the PACS)."""
    if path is None:
        return WatchRules()
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"watch rules file {path} does not exist; pass an existing YAML (docs/watch.md)") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"watch rules file {path} is not valid YAML: {err}") from err
    if doc is not None and not isinstance(doc, dict):
        raise ConfigError(f"watch rules file {path} must hold a mapping at the top level")
    return parse_rules(doc, source=str(path))


# ---------------------------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class StudyFacts:
    """What the rules look at: one study's modalities (pacsai's outputs left out) and the patient's other studies."""

    modalities: frozenset[str]
    study_date: str
    study_description: str
    #: (StudyDate, modalities) of the patient's other studies
    others: tuple[tuple[str, frozenset[str]], ...] = ()


def is_pacsai_output(series_number: Any, series_description: Any, modality: Any = None) -> bool:
    """Whether a series is one of the report's own outputs: series 900-903 whose description starts "pacsai".

    A back end that does not return SeriesDescription (the embedded store) is judged by number and modality
    (SEG, RTSTRUCT, SR or DOC in 900-903); a planner's series numbered like that there would be missed as a change.
    """
    try:
        number = int(series_number)
    except (TypeError, ValueError):
        return False
    if number not in OUTPUT_SERIES_NUMBERS:
        return False
    text = "" if series_description is None or (isinstance(series_description, float)) else str(series_description)
    if text:
        return text.lower().startswith("pacsai")
    return str(modality or "").upper() in OUTPUT_MODALITIES


def _why_not(trigger: Trigger, facts: StudyFacts) -> str | None:
    """``None`` when ``trigger`` matches, else the reason (no identifiers: modalities and dates only)."""
    have = ", ".join(sorted(facts.modalities)) or "none"
    if trigger.modality.upper() not in facts.modalities:
        return f"no {trigger.modality} series (modalities: {have})"
    missing = [m for m in trigger.with_ if m.upper() not in facts.modalities]
    if missing:
        return f"no {', '.join(missing)} series (modalities: {have})"
    if trigger.study_description and not fnmatch.fnmatch(
        facts.study_description.lower(), trigger.study_description.lower()
    ):
        return f"study description does not match {trigger.study_description!r}"
    if trigger.prior and not any(
        trigger.modality.upper() in mods and date and date < facts.study_date for date, mods in facts.others
    ):
        return f"no earlier study of the patient with a {trigger.modality} series"
    return None


def match(rules: WatchRules, facts: StudyFacts) -> tuple[str | None, str]:
    """``(trigger name, "")`` for the first trigger that matches, else ``(None, reason for each trigger)``."""
    reasons = []
    for trigger in rules.triggers:
        why = _why_not(trigger, facts)
        if why is None:
            return trigger.name, ""
        reasons.append(f"{trigger.name}: {why}")
    return None, "; ".join(reasons)
