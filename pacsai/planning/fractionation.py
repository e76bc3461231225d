"""Linear-quadratic fractionation: BED and EQD2 (docs/clinical_definitions.md "Fractionation").

BED = n·d·(1 + d/(α/β)); EQD2 = BED / (1 + 2/(α/β)), with n fractions of d Gy. Typical α/β: 10 Gy for tumours
and acute effects, 3 Gy for late effects (2 Gy for spinal cord/brain is also used). No repopulation or
incomplete-repair terms; the LQ model is not validated for very large doses per fraction (> ~8–10 Gy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pacsai.errors import PlanningError
from pacsai.planning.dvh import DVH


def _check(n: Any, d: Any, alpha_beta: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_, d_, ab = (np.asarray(v, dtype=float) for v in (n, d, alpha_beta))
    if np.any(n_ <= 0) or np.any(d_ < 0) or np.any(ab <= 0):
        raise PlanningError(
            f"fractionation needs n > 0 fractions, d ≥ 0 Gy per fraction and α/β > 0 Gy; got n={n}, d={d}, "
            f"α/β={alpha_beta}"
        )
    return n_, d_, ab


def _out(value: np.ndarray) -> Any:
    return float(value) if value.ndim == 0 else value


def bed(n: Any, d: Any, alpha_beta: Any) -> Any:
    """Biologically effective dose BED = n·d·(1 + d/(α/β)) (Gy).

    Parameters
    ----------
    n
        Number of fractions.
    d
        Dose per fraction (Gy).
    alpha_beta
        α/β ratio of the tissue (Gy).

    Returns
    -------
    float or numpy.ndarray
        Broadcast over array inputs.
    """
    n_, d_, ab = _check(n, d, alpha_beta)
    return _out(n_ * d_ * (1.0 + d_ / ab))


def eqd2(n: Any, d: Any, alpha_beta: Any) -> Any:
    """Equivalent dose in 2 Gy fractions EQD2 = BED / (1 + 2/(α/β)) (Gy).

    Parameters are as for :func:`bed`. Example: 20 × 2.75 Gy (55 Gy) at α/β = 10 Gy → 58.44 Gy.
    """
    n_, d_, ab = _check(n, d, alpha_beta)
    return _out(n_ * d_ * (1.0 + d_ / ab) / (1.0 + 2.0 / ab))


def eqd2_total(total_dose_gy: Any, n_fractions: Any, alpha_beta: Any) -> Any:
    """EQD2 of a total dose delivered in ``n_fractions`` equal fractions (e.g. a voxel's dose), in Gy."""
    total = np.asarray(total_dose_gy, dtype=float)
    if np.any(total < 0):
        raise PlanningError(f"total dose must be ≥ 0 Gy; got {total_dose_gy}")
    return eqd2(n_fractions, total / np.asarray(n_fractions, dtype=float), alpha_beta)


def eqd2_dvh(dvh: DVH, *, n_fractions: int, alpha_beta: float) -> DVH:
    """The DVH with every dose level converted to EQD2 (each voxel's total dose in ``n_fractions`` fractions).

    Each voxel's dose per fraction is its own total over ``n_fractions`` (d_i = D_i / n), not the
    prescription's: an OAR voxel at 20 Gy in 20 fractions gets 1 Gy fractions. The conversion is monotonic,
    so volumes carry over level by level; the mean is recomputed from the
    histogram levels (so it is exact to the DVH's resolution), min and max are converted exactly.
    """
    levels = dvh.doses
    weights = dvh.level_volumes_cc
    converted = np.asarray(eqd2_total(levels, n_fractions, alpha_beta), dtype=float)
    out = DVH.from_samples(
        converted,
        weights,
        name=dvh.name,
        method=f"{dvh.method}; EQD2 per voxel (n={n_fractions}, α/β={alpha_beta} Gy)",
        resolution=dvh.resolution,
    )
    out.min = float(eqd2_total(dvh.min, n_fractions, alpha_beta))
    out.max = float(eqd2_total(dvh.max, n_fractions, alpha_beta))
    out.uncovered_cc = dvh.uncovered_cc
    return out
