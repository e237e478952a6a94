"""What no execve takes is refused at render: a container's argument longer than Linux's
MAX_ARG_STRLEN (after `$(VAR)` expansion, the image's ENTRYPOINT and CMD included), a variable
as long, and argv plus environment over hpk's budget. Each fails the pod with InvalidPodSpec
naming the field, instead of a job whose launcher never starts (exit 126, no markers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from hpk.images import ImageConfig
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.pod.command import EXEC_BUDGET, MAX_ARG_STRLEN
from kubelet_py.pod.render import render_pod
from tests.unit.fakes import busybox, launches, pod, settings

LONGEST = MAX_ARG_STRLEN - 1
"""The longest word execve passes: the limit counts the NUL."""


def refusal(
    the_pod: dict[str, Any], configs: Mapping[str, ImageConfig] | None = None
) -> InvalidPodSpec:
    with pytest.raises(InvalidPodSpec) as caught:
        render_pod(the_pod, settings(image_configs=configs or {}))
    return caught.value


def test_a_word_of_the_longest_length_renders() -> None:
    word = "x" * LONGEST
    rendered = render_pod(pod("p", busybox("main", command=["echo", word])), settings())
    assert launches(rendered)["main"][-1] == word


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"command": ["echo", "x" * MAX_ARG_STRLEN]}, "spec.containers[0].command[1]"),
        ({"command": ["echo"], "args": ["a", "y" * MAX_ARG_STRLEN]}, "spec.containers[0].args[1]"),
        # Bytes count, not characters: 65536 two-byte characters are one byte too many.
        ({"command": ["echo", "é" * (MAX_ARG_STRLEN // 2)]}, "spec.containers[0].command[1]"),
    ],
)
def test_a_word_over_the_limit_fails_the_pod(fields: dict[str, Any], field: str) -> None:
    error = refusal(pod("p", busybox("main", **fields)))
    assert error.field == field
    assert f"no argument longer than {LONGEST} bytes" in error.problem


def test_the_limit_holds_after_variable_expansion() -> None:
    half = "z" * (MAX_ARG_STRLEN // 2)
    container = busybox(
        "main",
        command=["sh", "-c"],
        args=["$(HALF)$(HALF)"],
        env=[{"name": "HALF", "value": half}],
    )
    error = refusal(pod("p", container))
    assert error.field == "spec.containers[0].args[0]"
    assert f"the word is {2 * len(half)} bytes long after $(VAR) expansion" in error.problem
    # `$$(HALF)` is the literal text, which is short.
    container["args"] = ["$$(HALF)$$(HALF)"]
    assert launches(render_pod(pod("p", container), settings()))["main"][-1] == "$(HALF)$(HALF)"


def test_the_images_own_words_count_when_they_run() -> None:
    long_cmd = ImageConfig(oci=True, entrypoint=("/bin/echo",), cmd=("c" * MAX_ARG_STRLEN,))
    configs = {"busybox": long_cmd}
    error = refusal(pod("p", busybox("main")), configs)
    assert error.field == "spec.containers[0].image"
    assert "a word of its ENTRYPOINT or CMD" in error.problem
    # `args` replace CMD, so the long word is not passed.
    rendered = render_pod(pod("p", busybox("main", args=["hi"])), settings(image_configs=configs))
    assert launches(rendered)["main"][-2:] == ["/bin/echo", "hi"]


def test_a_variable_over_the_limit_fails_the_pod() -> None:
    # NAME=value and its NUL: "V=" plus the value plus one.
    fits = busybox("main", command=["true"], env=[{"name": "V", "value": "v" * (LONGEST - 2)}])
    render_pod(pod("p", fits), settings())
    over = busybox("main", command=["true"], env=[{"name": "V", "value": "v" * (LONGEST - 1)}])
    error = refusal(pod("p", over))
    assert error.field == "spec.containers[0].env"
    assert f"variable V is {LONGEST - 1} bytes long" in error.problem


def test_arguments_and_environment_together_have_a_budget() -> None:
    word = "w" * 100_000
    args = [word] * (EXEC_BUDGET // (len(word) + 1))
    used = len("true") + 1 + sum(len(arg) + 1 for arg in args)
    exactly = EXEC_BUDGET - used - len("E=") - 1  # the value that fills the budget

    def container(value: str) -> dict[str, Any]:
        return busybox("main", command=["true"], args=args, env=[{"name": "E", "value": value}])

    render_pod(pod("p", container("e" * exactly)), settings())
    error = refusal(pod("p", container("e" * (exactly + 1))))
    assert error.field == "spec.containers[0]"
    assert f"take {EXEC_BUDGET + 1} bytes, more than the {EXEC_BUDGET} hpk allows" in error.problem


def test_init_containers_are_checked_too() -> None:
    the_pod = pod(
        "p",
        busybox("main", command=["true"]),
        initContainers=[busybox("first", command=["echo", "i" * MAX_ARG_STRLEN])],
    )
    assert refusal(the_pod).field == "spec.initContainers[0].command[1]"
