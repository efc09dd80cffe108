"""Lesion-load distributions (mm³) that synthetic cases are drawn from."""

from __future__ import annotations

import numpy as np

from .errors import InputError

FAMILIES = ("low", "medium", "high", "uniform", "gaussian", "real")


def load_band(family: str, real_loads, load_range=None) -> tuple[float, float]:
    """The [lo, hi] interval a family draws from (gaussian and real: the whole observed range)."""
    lo, hi = _range(real_loads, load_range)
    third = (hi - lo) / 3.0
    return {
        "low": (lo, lo + third),
        "medium": (lo + third, lo + 2 * third),
        "high": (lo + 2 * third, hi),
    }.get(family, (lo, hi))


def _range(real_loads, load_range) -> tuple[float, float]:
    if load_range is not None:
        lo, hi = float(load_range[0]), float(load_range[1])
        if not (0 <= lo <= hi) or not np.isfinite(hi):
            raise InputError(f"--load-range {lo} {hi}: need 0 ≤ LO ≤ HI (mm³)")
        return lo, hi
    loads = np.asarray(real_loads, dtype=np.float64)
    if loads.size == 0:
        raise InputError("the bank holds no cases to take a load distribution from")
    return float(loads.min()), float(loads.max())


def draw_target_load(family: str, rng: np.random.Generator, real_loads, load_range=None) -> float:
    """Draw one target load (mm³) from a family.

    real = resample the observed per-case loads; uniform = U(min, max); gaussian = N(mean, sd)
    truncated at 0; low / medium / high = uniform over the lower / middle / upper third of [min, max].
    `load_range` replaces the observed [min, max] (for `real` and `gaussian` too: uniform over it is not
    meant, so real/gaussian draws are clipped into it).
    """
    if family not in FAMILIES:
        raise InputError(f"--load {family!r}: choose one of {', '.join(FAMILIES)}")
    loads = np.asarray(real_loads, dtype=np.float64)
    lo, hi = _range(loads, load_range)
    if family == "real":
        value = float(rng.choice(loads))
    elif family == "gaussian":
        mean, sd = float(loads.mean()), float(loads.std())
        value = 0.0
        for _ in range(1000):
            value = float(rng.normal(mean, sd)) if sd > 0 else mean
            if value >= 0:
                break
        value = max(value, 0.0)
    else:
        band_lo, band_hi = load_band(family, loads, load_range)
        return float(rng.uniform(band_lo, band_hi))
    if load_range is not None:
        value = float(np.clip(value, lo, hi))
    return value
