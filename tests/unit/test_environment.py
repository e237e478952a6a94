"""A container's environment on its own: Kubernetes' `$(VAR)` expansion, and the env file
Apptainer reads (the environment as rendered pods get it is tested in test_render.py)."""

from __future__ import annotations

import pytest

from kubelet_py.pod.environment import env_file, expand


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("plain", "plain"),
        ("$(A)", "a"),
        ("x$(A)y$(B)z", "xaybz"),
        ("$$(A)", "$(A)"),
        ("$$$(A)", "$a"),
        ("$$$$(A)", "$$(A)"),
        ("$(MISSING)", "$(MISSING)"),
        ("$(A", "$(A"),
        ("$(", "$("),
        ("$", "$"),
        ("a$", "a$"),
        ("$A", "$A"),
        ("${A}", "${A}"),
        ("$()", "$()"),
        ("$(A)$(A)", "aa"),
        ("$x$(A)", "$xa"),
        ("ü$(A)ü", "üaü"),
    ],
)
def test_kubernetes_variable_expansion(text: str, expanded: str) -> None:
    assert expand(text, {"A": "a", "B": "b"}) == expanded


def test_env_file_golden_lines() -> None:
    assert env_file({"A": "x y", "B": "it's", "C": ""}) == (
        "# Read by apptainer --env-file; every value is a literal string.\n"
        "A='x y'\n"
        "B='it'\"'\"'s'\n"
        "C=''\n"
    )
