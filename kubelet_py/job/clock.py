"""The kubelet's clock, and the time format of the API server's objects.

Here, in the standard-library-only layer, so that every layer that stamps an object (the
controller, the binder, the node agent, the Events, the pod status) uses the same two
definitions. The API server's times are whole seconds; the pod folder's markers carry
nanoseconds, in another format (kubelet_py.job.launch.rfc3339).
"""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    """Now, in UTC: the default clock of the loops (their unit tests pass a fake)."""
    return dt.datetime.now(dt.UTC)


def api_time(moment: dt.datetime) -> str:
    """`moment` as the API server writes a Time: UTC, whole seconds (2025-01-02T03:04:05Z)."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
