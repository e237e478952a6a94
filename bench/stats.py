"""The harness's arithmetic: percentiles, summaries and times. Pure, stdlib only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` (0..1) percentile with linear interpolation between closest ranks.

    The same definition as numpy's default ("linear"): p50 of [1, 2, 3, 4] is 2.5.
    """
    if not values:
        raise ValueError("no values")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within 0..1, not {fraction}")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """Count, min, p50, p95, p99, max and mean of a sample (seconds stay seconds)."""
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "min": round(min(values), 6),
        "p50": round(percentile(values, 0.50), 6),
        "p95": round(percentile(values, 0.95), 6),
        "p99": round(percentile(values, 0.99), 6),
        "max": round(max(values), 6),
        "mean": round(sum(values) / len(values), 6),
    }


def rate(count: int, seconds: float) -> float:
    """Events per second; infinity for a zero span (a single event)."""
    return count / seconds if seconds > 0 else math.inf


def per_minute(count: float, seconds: float) -> float:
    """A count over a window of `seconds`, scaled to one minute."""
    if seconds <= 0:
        raise ValueError("the window must last longer than zero seconds")
    return count * 60.0 / seconds


def marker_time(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 UTC time with up to nine fractional digits,
    as the job writes its markers ("2025-01-02T03:04:05.123456789Z"). Nanoseconds are kept
    as far as a float keeps them (about a tenth of a microsecond today)."""
    text = text.strip()
    if not text.endswith("Z"):
        raise ValueError(f"not a UTC time: {text!r}")
    whole, _, fraction = text[:-1].partition(".")
    base = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    if fraction and not fraction.isdigit():
        raise ValueError(f"bad fraction in {text!r}")
    nanos = int((fraction + "000000000")[:9]) if fraction else 0
    return base.timestamp() + nanos / 1e9
