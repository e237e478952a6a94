"""The kubelet's clock, and its two time formats: the API server's and the pod folder's.

Here, in the standard-library-only layer, so that every layer that stamps an object (the
controller, the binder, the node agent, the Events, the pod status) and the job that writes
markers and log lines use the same definitions. The API server's times are whole seconds
(`api_time`); the pod folder's carry nanoseconds (`rfc3339`; read by
kubelet_py.job.podfolder.parse_time).
"""

from __future__ import annotations

import datetime as dt
import time


def utcnow() -> dt.datetime:
    """Now, in UTC: the default clock of the loops (their unit tests pass a fake)."""
    return dt.datetime.now(dt.UTC)


def api_time(moment: dt.datetime) -> str:
    """`moment` as the API server writes a Time: UTC, whole seconds (2025-01-02T03:04:05Z)."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339(nanoseconds: int) -> str:
    """UTC time in RFC 3339 with nine fractional digits, as the pod folder's markers and log
    lines carry it: 2024-05-01T12:00:00.000000001Z."""
    seconds, fraction = divmod(nanoseconds, 1_000_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{fraction:09d}Z"
