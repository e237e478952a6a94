"""Typed errors about pods that the kubelet's layers raise and the provider turns into status.

A pod-level error fails that one pod with a reason and an Event; it never stops the kubelet.
This module holds only the error types, and the one check of a pod's JSON shape every layer
makes, so that pure layers can raise them without importing anything else of the kubelet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class InvalidPodSpec(ValueError):
    """The pod asks for something hpk cannot do, or says it in a way hpk cannot read.

    `field` is the path of the offending field in the pod's JSON
    (`spec.containers[0].resources.requests[memory]`), so the reason the user reads on the pod
    points at what to change.
    """

    reason = "InvalidPodSpec"
    """The short reason the pod's status carries."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def expect_object(value: object, where: str) -> Mapping[str, Any]:
    """`value` as a JSON object ({} for an absent field); InvalidPodSpec naming `where` when it
    is something else."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidPodSpec(where, "must be an object")
    return value
