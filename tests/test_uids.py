from __future__ import annotations

import re

import pytest

from pacsai.uids import derive_uid

UID = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))*$")


def test_stable_and_valid():
    a = derive_uid("1.2.3", "model", 3)
    assert a == derive_uid("1.2.3", "model", 3)
    assert a.startswith("2.25.") and len(a) <= 64 and UID.match(a)


def test_separator_matters():
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert derive_uid("a") != derive_uid("a", "")


def test_needs_input():
    with pytest.raises(ValueError):
        derive_uid()
