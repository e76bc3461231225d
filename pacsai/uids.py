"""Deterministic DICOM UIDs.

Same inputs → same UID → re-sending adds nothing to a PACS; changed content → new UID → never a silent discard
(Orthanc keeps the old object when a different one arrives under a known SOP Instance UID; docs/dicom_notes.md).
UIDs are ``2.25.<integer>`` from a UUID5 over the inputs joined with a separator that cannot occur in them,
so ``("ab", "c")`` and ``("a", "bc")`` differ (pydicom's ``generate_uid`` gets that wrong).
"""

from __future__ import annotations

import uuid

_NAMESPACE = uuid.UUID("6f1b6c1e-3d5e-5c2a-9b1e-706163736169")  # fixed forever: changing it changes every UID
_SEP = "\x1f"  # ASCII unit separator


def derive_uid(*parts: object) -> str:
    """A stable, valid UID (≤ 64 chars, no leading zeros) from any inputs that shape an object's content.

    Parameters
    ----------
    parts
        Strings or values with a stable ``str()``: source UIDs, model version, parameters, pacsai version,
        a purpose label such as ``"seg-series"``.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one input")
    text = _SEP.join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_NAMESPACE, text).int}"
