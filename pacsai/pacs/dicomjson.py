"""DICOM JSON (PS3.18 F.2) values: the one shape QIDO answers, STOW answers and the embedded index share."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def dicom_json_value(item: Mapping[str, object], tag: str) -> object:
    """First value of ``tag`` (8 hex digits) in a DICOM JSON object, or ``None``."""
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, Mapping) else None
    return values[0] if isinstance(values, list) and values else None


def dicom_json_text(item: Mapping[str, object], tag: str) -> str | None:
    """:func:`dicom_json_value` as text (``None`` when absent or empty)."""
    value = dicom_json_value(item, tag)
    return str(value) if value not in (None, "") else None


def as_int(value: object) -> int | None:
    """An IS/US/UL value (number or text) as an int, or ``None`` when absent or not a number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    try:
        return int(float(str(value)))
    except ValueError:
        return None


def order_instances(items: Iterable[Mapping[str, object]]) -> list[str]:
    """SOPInstanceUIDs (0008,0018) of instance results, by InstanceNumber (0020,0013); those without one last."""
    keyed: list[tuple[int, str]] = []
    for item in items:
        sop = dicom_json_value(item, "00080018")
        number = as_int(dicom_json_value(item, "00200013"))
        if sop:
            keyed.append((number if number is not None else 1 << 62, str(sop)))
    return [sop for _, sop in sorted(keyed)]


__all__ = ["as_int", "dicom_json_text", "dicom_json_value", "order_instances"]
