"""The report's parameters: the single contract between the CLI, papermill and the template's validation cell."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pacsai.errors import ReportError


class ReportParameters(BaseModel):
    """What shapes one report. Everything here goes into the report's provenance and its DICOM UIDs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patient_id: str = Field(min_length=1, description="PatientID on the PACS")
    study_uid: str = Field("", description="StudyInstanceUID of the planning study; empty = the latest with a CT")
    pacs_url: str = Field("", description="DICOMweb URL or file://; empty = settings (PACSAI_PACS_URL)")
    structures_from: Literal["pacs", "model"] = "pacs"
    model_uri: str = Field("", description="models:/name@champion, models:/name/3 or runs:/...; for 'model'")
    target: str = Field("GTV", description="ROI name of the gross tumour volume")
    ctv_margin_mm: float | tuple[float, float, float] = Field(5.0, description="GTV→CTV margin, mm (x, y, z)")
    ptv_margin_mm: float | tuple[float, float, float] = Field(5.0, description="CTV→PTV set-up margin, mm")
    constraint_set: str = Field("thorax", description="constraint table (site name or YAML path)")
    prescription_gy: float = Field(60.0, gt=0)
    fractions: int = Field(30, gt=0)
    alpha_beta_tumour_gy: float = Field(10.0, gt=0)
    alpha_beta_oar_gy: float = Field(3.0, gt=0)
    smoke: bool = False

    @field_validator("ctv_margin_mm", "ptv_margin_mm", mode="before")
    @classmethod
    def _margin(cls, value: Any) -> Any:
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, tuple) and len(value) != 3:
            raise ValueError("a per-axis margin needs three values (x, y, z) in mm")
        values = value if isinstance(value, tuple) else (value,)
        if any(float(v) < 0 for v in values):
            raise ValueError("margins are ≥ 0 mm")
        return value

    @model_validator(mode="after")
    def _model_needs_uri(self) -> ReportParameters:
        if self.structures_from == "model" and not self.model_uri:
            raise ValueError(
                "structures from a model need the model: give model_uri (pacsai report --model), e.g. "
                "models:/pacsai-thorax@champion"
            )
        return self

    @property
    def dose_per_fraction_gy(self) -> float:
        return self.prescription_gy / self.fractions


#: The ``pacsai report`` option of each parameter, so that an error names what the user typed.
CLI_OPTIONS: dict[str, str] = {
    "patient_id": "PATIENT_ID", "study_uid": "--study", "pacs_url": "--pacs", "structures_from": "--structures-from",
    "model_uri": "--model", "ctv_margin_mm": "--ctv-margin", "ptv_margin_mm": "--ptv-margin",
    "constraint_set": "--constraints", "prescription_gy": "--prescription", "fractions": "--fractions",
    "smoke": "--smoke",
}


def _problem(error: Mapping[str, Any]) -> str:
    """One pydantic error in the user's terms: which parameter (and CLI option), the value, what is wrong."""
    field = str(error["loc"][0]) if error.get("loc") else ""
    kind = str(error.get("type", ""))
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "value_error":
        what = str(ctx.get("error", error["msg"]))
    elif kind == "missing":
        what = "is required"
    elif kind == "extra_forbidden":
        known = ", ".join(ReportParameters.model_fields)
        return f"{field} is not a report parameter (they are: {known})"
    elif kind == "string_too_short":
        what = "must not be empty"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {"greater_than": "more than", "greater_than_equal": "at least", "less_than": "less than",
                 "less_than_equal": "at most"}[kind]
        limit = next(iter(ctx.values()), "")
        what = f"must be {words} {limit:g}" if isinstance(limit, (int, float)) else f"must be {words} {limit}"
    elif kind == "literal_error":
        what = f"must be {ctx.get('expected', 'one of the listed values')}"
    elif kind.startswith(("int_", "float_")):
        what = "must be a whole number" if kind.startswith("int_") else "must be a number"
    elif kind.startswith("bool_"):
        what = "must be true or false"
    else:
        what = str(error["msg"]).replace("Input should be", "must be")
    if not field:
        return what
    option = CLI_OPTIONS.get(field)
    shown = f"{field} ({option})" if option else field
    got = "" if kind == "missing" else f" (got {value!r})"
    return f"{shown} {what}{got}" if kind == "missing" else f"{shown}: {what}{got}"


def validate_parameters(**values: Any) -> ReportParameters:
    """Validate papermill parameters; a ReportError names every wrong one in the user's terms.

    Each problem names the parameter, its ``pacsai report`` option, the value given and what is wrong, e.g.
    ``prescription_gy (--prescription): must be more than 0 (got -5.0)``.
    """
    try:
        return ReportParameters(**values)
    except ValidationError as err:
        problems = "; ".join(_problem(e) for e in err.errors())
        raise ReportError(f"invalid report parameters: {problems}") from err
