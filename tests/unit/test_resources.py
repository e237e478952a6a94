"""Kubernetes quantities, the pod's effective request, and the sbatch options they become."""

from __future__ import annotations

from fractions import Fraction

import pytest

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.pod.resources import (
    deadline_minutes,
    effective_resources,
    parse_quantity,
    resource_options,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2", 2),
        (2, 2),
        ("0", 0),
        ("500m", Fraction(1, 2)),
        ("1.5", Fraction(3, 2)),
        ("0.1", Fraction(1, 10)),
        (".5", Fraction(1, 2)),
        ("1.", 1),
        ("+3", 3),
        ("100n", Fraction(1, 10**7)),
        ("250u", Fraction(1, 4000)),
        ("1k", 1000),
        ("1Ki", 1024),
        ("64Mi", 64 << 20),
        ("1.5Gi", 3 << 29),
        ("2Ti", 2 << 40),
        ("1Pi", 1 << 50),
        ("1Ei", 1 << 60),
        ("1M", 10**6),
        ("1G", 10**9),
        ("3T", 3 * 10**12),
        ("1P", 10**15),
        ("2E", 2 * 10**18),
        ("1e3", 1000),
        ("1E3", 1000),
        ("12e-1", Fraction(6, 5)),
        ("1e+2", 100),
        ("128974848", 128974848),
        ("129e6", 129 * 10**6),
    ],
)
def test_quantities(text: str | int, value: Fraction | int) -> None:
    assert parse_quantity(text, field="f") == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "is not a quantity"),
        ("Mi", "is not a quantity"),
        ("1.2.3", "unknown suffix"),
        ("1mi", "unknown suffix 'mi'"),
        ("1 Gi", "unknown suffix ' Gi'"),
        ("1KB", "unknown suffix"),
        ("1e", "unknown suffix"),
        ("1e3.5", "unknown suffix"),
        ("1e999999999", "exponent out of range"),
        ("1" * 100, "too long"),
        ("--1", "is not a quantity"),
        (True, "is not a quantity"),
        (1.5, "is not a quantity"),
        (None, "is not a quantity"),
    ],
)
def test_bad_quantities_name_the_field(value: object, message: str) -> None:
    with pytest.raises(InvalidPodSpec, match=message) as caught:
        parse_quantity(value, field="spec.containers[0].resources.requests[cpu]")
    assert caught.value.field == "spec.containers[0].resources.requests[cpu]"


def container(
    name: str, requests: dict[str, object] | None = None, limits: dict[str, object] | None = None
) -> dict[str, object]:
    resources = {"requests": requests or {}, "limits": limits or {}}
    return {"name": name, "image": "busybox", "resources": resources}


def test_main_containers_add_up() -> None:
    spec = {
        "containers": [
            container("a", {"cpu": "500m", "memory": "100Mi"}),
            container("b", {"cpu": "250m", "memory": "28Mi"}),
        ]
    }
    wanted = effective_resources(spec)
    assert (wanted.cpu, wanted.memory) == (Fraction(3, 4), 128 << 20)
    assert (wanted.cpus, wanted.memory_mib) == (1, 128)


def test_the_largest_init_container_wins_when_it_is_larger() -> None:
    spec = {
        "initContainers": [
            container("i1", {"cpu": "3", "memory": "10Mi"}),
            container("i2", {"cpu": "1", "memory": "1Gi"}),
        ],
        "containers": [
            container("a", {"cpu": "1", "memory": "100Mi"}),
            container("b", {"cpu": "1", "memory": "100Mi"}),
        ],
    }
    wanted = effective_resources(spec)
    assert (wanted.cpus, wanted.memory_mib) == (3, 1024)


def test_requests_fall_back_to_limits_per_resource() -> None:
    spec = {
        "containers": [
            container("a", {"cpu": "2"}, {"cpu": "4", "memory": "1Gi"}),
            container("b", None, {"cpu": "1", "memory": "512Mi", "nvidia.com/gpu": "2"}),
        ]
    }
    wanted = effective_resources(spec)
    assert (wanted.cpus, wanted.memory_mib, wanted.gpus) == (3, 1536, 2)


def test_rounding_is_up() -> None:
    spec = {"containers": [container("a", {"cpu": "1001m", "memory": "1000000"})]}
    wanted = effective_resources(spec)
    assert (wanted.cpus, wanted.memory_mib) == (2, 1)


def test_no_requests_no_options() -> None:
    assert resource_options({"containers": [{"name": "a", "image": "busybox"}]}) == []


def test_zero_requests_send_no_options() -> None:
    # --mem=0 would ask Slurm for all of a node's memory.
    spec = {"containers": [container("a", {"cpu": "0", "memory": "0"})]}
    assert resource_options(spec) == []


def test_options_for_cpu_memory_gpu_and_deadline() -> None:
    spec = {
        "activeDeadlineSeconds": 61,
        "containers": [container("a", {"cpu": "1.5", "memory": "1.5Gi", "nvidia.com/gpu": "1"})],
    }
    assert [option.argv() for option in resource_options(spec)] == [
        "--cpus-per-task=2",
        "--mem=1536M",
        "--gres=gpu:1",
        "--time=2",
    ]


@pytest.mark.parametrize(
    ("seconds", "minutes"), [(1, 1), (60, 1), (61, 2), (3600, 60), (None, None)]
)
def test_deadline_in_minutes_rounded_up(seconds: int | None, minutes: int | None) -> None:
    spec = {} if seconds is None else {"activeDeadlineSeconds": seconds}
    assert deadline_minutes(spec) == minutes


@pytest.mark.parametrize("seconds", [0, -5, "60", 1.5, True])
def test_bad_deadlines(seconds: object) -> None:
    with pytest.raises(InvalidPodSpec, match=r"^spec\.activeDeadlineSeconds: "):
        deadline_minutes({"activeDeadlineSeconds": seconds})


@pytest.mark.parametrize(
    ("resources", "field", "message"),
    [
        (
            {"requests": {"cpu": "lots"}},
            "spec.containers[1].resources.requests[cpu]",
            "not a quantity",
        ),
        ({"limits": {"memory": "1GB"}}, "spec.containers[1].resources.limits[memory]", "suffix"),
        (
            {"requests": {"memory": "-1Gi"}},
            "spec.containers[1].resources.requests[memory]",
            "negative",
        ),
        (
            {"requests": {"nvidia.com/gpu": "500m"}},
            "spec.containers[1].resources.requests[nvidia.com/gpu]",
            "whole number",
        ),
        (
            {"requests": {"ephemeral-storage": "1Gi"}},
            "spec.containers[1].resources.requests[ephemeral-storage]",
            "not supported",
        ),
        ({"claims": [{"name": "x"}]}, "spec.containers[1].resources.claims", "not supported"),
        ({"requests": ["cpu"]}, "spec.containers[1].resources.requests", "must be an object"),
    ],
)
def test_bad_resources_name_the_field(
    resources: dict[str, object], field: str, message: str
) -> None:
    spec = {
        "containers": [
            {"name": "ok", "image": "busybox"},
            {"name": "bad", "image": "busybox", "resources": resources},
        ]
    }
    with pytest.raises(InvalidPodSpec, match=message) as caught:
        effective_resources(spec)
    assert caught.value.field == field
