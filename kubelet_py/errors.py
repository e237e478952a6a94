"""Typed errors about pods that the kubelet's layers raise and the provider turns into status.

A pod-level error fails that one pod with a reason and an Event; it never stops the kubelet.
This module holds only the error types, and the one check of a pod's JSON shape every layer
makes, so that pure layers can raise them without importing anything else of the kubelet.

The backend errors (`BackendError`, `SubmissionRefused`) are what the pod controller catches
from a provider, whatever runs its pods: the Slurm adapter's errors are their subclasses, so
the controller never names Slurm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


class MissingReference(Exception):
    """A ConfigMap, Secret or key the pod needs does not exist (and is not optional)."""

    reason = "CreateContainerConfigError"
    """The waiting reason the pod's containers carry until it appears."""

    def __init__(self, *, field: str, kind: str, namespace: str, name: str, key: str = "") -> None:
        what = f'{kind} "{namespace}/{name}"'
        problem = f'key "{key}" not found in {what}' if key else f"{what} not found"
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.kind = kind
        self.name = name
        self.key = key


class ImageNotResolved(LookupError):
    """The settings name no SIF file for a container's image: the caller resolves images."""

    def __init__(self, reference: str, known: Sequence[str]) -> None:
        super().__init__(
            f"no SIF file given for image {reference}; given: {', '.join(known) or 'none'}"
        )
        self.reference = reference


class BackendError(Exception):
    """What runs the pods failed to do what it was asked (it could not be reached, or a
    command failed); the message is the backend's. Trying again later may succeed."""


class SubmissionRefused(BackendError):
    """The backend refused the pod's job; the message is its own. Trying the same job again
    will not help, so the pod fails."""


def expect_object(value: object, where: str) -> Mapping[str, Any]:
    """`value` as a JSON object ({} for an absent field); InvalidPodSpec naming `where` when it
    is something else."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidPodSpec(where, "must be an object")
    return value
