"""The QA gate's vocabulary: a :class:`Reason` is one thing pacsai could not trust, and :func:`gate_status` turns
the reasons into PASS / REVIEW / FAIL.

Why a gate at all: a segmentation model always answers, also on an abdomen, an MR or a phantom it never saw. Every
statement made from model contours (a volume, a constraint verdict, a response category) is only as good as the
contours and the input, so the report first says whether it can be trusted, with the reasons and their numbers.
Levels:

- ``error``: the statement cannot be made (an empty target, an input unlike the training data) → FAIL;
- ``review``: a person must look before relying on it (a fragmented organ, an unusual volume) → REVIEW;
- ``note``: worth knowing, changes nothing (e.g. dose sampling details).

With no error and no review reason the status is PASS: a gate that flags good contours teaches users to ignore it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

LEVELS = ("error", "review", "note")
PASS, REVIEW, FAIL = "PASS", "REVIEW", "FAIL"


@dataclass(frozen=True)
class Reason:
    """One reason of the QA gate.

    Attributes
    ----------
    code
        Stable UPPER_SNAKE identifier (``EMPTY_STRUCTURE``, ``DOMAIN_MODALITY`` ...), for tests and filters.
    level
        ``error`` | ``review`` | ``note``.
    message
        One sentence a physicist understands, with the numbers.
    structure
        The structure it concerns, if any.
    values
        The numbers behind it (measured value, limit, training range ...), JSON-able.
    """

    code: str
    level: str
    message: str
    structure: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"Reason.level must be one of {LEVELS}, got {self.level!r}")
        if not self.code or self.code.upper() != self.code:
            raise ValueError(f"Reason.code must be UPPER_SNAKE, got {self.code!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "level": self.level,
            "message": self.message,
            "structure": self.structure,
            "values": dict(self.values),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reason:
        return cls(
            code=str(d["code"]),
            level=str(d["level"]),
            message=str(d["message"]),
            structure=d.get("structure"),
            values=dict(d.get("values") or {}),
        )


def gate_status(reasons: Iterable[Reason | Mapping[str, Any]]) -> str:
    """``FAIL`` if any reason is an error, else ``REVIEW`` if any is a review, else ``PASS``."""
    levels = {r.level if isinstance(r, Reason) else str(r["level"]) for r in reasons}
    if "error" in levels:
        return FAIL
    if "review" in levels:
        return REVIEW
    return PASS


__all__ = ["FAIL", "LEVELS", "PASS", "REVIEW", "Reason", "gate_status"]
