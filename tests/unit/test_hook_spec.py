"""Lifecycle hooks at render time: what the hooks file holds, which hooks are refused (an
InvalidPodSpec naming the field), and the tcpSocket handler that is accepted and not run.
The job script of a pod with both hooks is a golden file in test_render.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.pod.hook_spec import HOOK_IGNORED
from kubelet_py.pod.render import RenderedPod, render_pod
from tests.unit.fakes import Pod, busybox, pod, settings

HOOKS_FILE = "hooks/main"


def with_lifecycle(lifecycle: Any, **spec: Any) -> Pod:
    main = busybox(
        "main",
        command=["httpd", "-f"],
        ports=[{"name": "web", "containerPort": 8080}],
        lifecycle=lifecycle,
    )
    return pod("hooked", main, **spec)


def rendered(lifecycle: Any, **spec: Any) -> RenderedPod:
    return render_pod(with_lifecycle(lifecycle, **spec), settings("hooked"))


def refused(the_pod: Pod) -> InvalidPodSpec:
    with pytest.raises(InvalidPodSpec) as caught:
        render_pod(the_pod, settings("hooked"))
    return caught.value


def test_both_hooks_go_to_the_hooks_file_with_named_ports_resolved() -> None:
    result = rendered(
        {
            "postStart": {"exec": {"command": ["sh", "-c", "echo hi > /work/started"]}},
            "preStop": {
                "httpGet": {
                    "port": "web",
                    "path": "/drain",
                    "scheme": "HTTPS",
                    "httpHeaders": [{"name": "X-Why", "value": "deleted"}],
                }
            },
        },
        terminationGracePeriodSeconds=12,
    )
    assert json.loads(result.files[HOOKS_FILE]) == {
        "grace": 12,
        "postStart": {"kind": "exec", "command": ["sh", "-c", "echo hi > /work/started"]},
        "preStop": {
            "kind": "httpGet",
            "host": "127.0.0.1",
            "port": 8080,
            "path": "/drain",
            "scheme": "HTTPS",
            "headers": [["X-Why", "deleted"]],
        },
    }
    assert "--hooks /home/alice/.hpk/pods/default/hooked/hooks/main " in result.script


def test_a_sleep_hook_and_the_default_grace_period() -> None:
    result = rendered({"preStop": {"sleep": {"seconds": 0}}})
    assert json.loads(result.files[HOOKS_FILE]) == {
        "grace": 30,
        "preStop": {"kind": "sleep", "seconds": 0},
    }


@pytest.mark.parametrize("lifecycle", [None, {}, {"postStart": None}])
def test_a_container_without_hooks_has_no_hooks_file(lifecycle: Any) -> None:
    result = rendered(lifecycle)
    assert HOOKS_FILE not in result.files
    assert "--hooks" not in result.script


@pytest.mark.parametrize(
    ("lifecycle", "field", "words"),
    [
        ({"postStart": {}}, "lifecycle.postStart", "exactly one handler"),
        (
            {"preStop": {"exec": {"command": ["true"]}, "sleep": {"seconds": 1}}},
            "lifecycle.preStop",
            "exactly one handler",
        ),
        (
            {"preStop": {"tcpSocket": {"port": 80}, "sleep": {"seconds": 1}}},
            "lifecycle.preStop",
            "exactly one handler",
        ),
        ({"preStop": {"sleep": {"seconds": -1}}}, "lifecycle.preStop.sleep.seconds", "from 0"),
        ({"preStop": {"sleep": {"seconds": 31}}}, "lifecycle.preStop.sleep.seconds", "(30)"),
        ({"preStop": {"sleep": {"seconds": "5"}}}, "lifecycle.preStop.sleep.seconds", "whole"),
        ({"preStop": {"sleep": {}}}, "lifecycle.preStop.sleep.seconds", "whole"),
        ({"postStart": {"httpGet": {"port": 0}}}, "lifecycle.postStart.httpGet.port", "1-65535"),
        (
            {"postStart": {"httpGet": {"port": 70000}}},
            "lifecycle.postStart.httpGet.port",
            "1-65535",
        ),
        (
            {"postStart": {"httpGet": {"port": "metrics"}}},
            "lifecycle.postStart.httpGet.port",
            "names no port",
        ),
        ({"postStart": {"httpGet": {}}}, "lifecycle.postStart.httpGet.port", "port number"),
        (
            {"postStart": {"httpGet": {"port": 80, "scheme": "FTP"}}},
            "lifecycle.postStart.httpGet.scheme",
            "neither",
        ),
        (
            {"postStart": {"httpGet": {"port": 80, "path": "ready"}}},
            "lifecycle.postStart.httpGet.path",
            "starting with /",
        ),
        (
            {"postStart": {"httpGet": {"port": 80, "httpHeaders": [{"name": "A: B"}]}}},
            "lifecycle.postStart.httpGet.httpHeaders[0].name",
            "header name",
        ),
        ({"postStart": {"exec": {"command": []}}}, "lifecycle.postStart.exec.command", "list"),
        ({"postStart": {"exec": {}}}, "lifecycle.postStart.exec.command", "list"),
        ({"postStart": {"grpc": {"port": 80}}}, "lifecycle.postStart.grpc", "not supported"),
        ({"stopSignal": "SIGUSR1"}, "lifecycle.stopSignal", "not supported"),
        ("now", "lifecycle", "object"),
    ],
)
def test_a_bad_hook_is_refused_naming_its_field(lifecycle: Any, field: str, words: str) -> None:
    error = refused(with_lifecycle(lifecycle))
    assert error.field == f"spec.containers[0].{field}", error
    assert words in str(error), error


def test_a_sleep_may_last_the_pods_own_grace_period() -> None:
    result = rendered({"preStop": {"sleep": {"seconds": 45}}}, terminationGracePeriodSeconds=45)
    assert json.loads(result.files[HOOKS_FILE])["preStop"]["seconds"] == 45
    too_long = with_lifecycle(
        {"preStop": {"sleep": {"seconds": 46}}}, terminationGracePeriodSeconds=45
    )
    error = refused(too_long)
    assert error.field == "spec.containers[0].lifecycle.preStop.sleep.seconds", error


def test_a_tcp_socket_hook_is_accepted_not_run_and_warned_of() -> None:
    result = rendered({"preStop": {"tcpSocket": {"port": 8080}}})
    assert HOOKS_FILE not in result.files
    assert "--hooks" not in result.script
    [(reason, message)] = result.warnings
    assert reason == HOOK_IGNORED
    assert message.startswith("spec.containers[0].lifecycle.preStop.tcpSocket: not run")
    # Beside a hook that runs, only that one goes to the launcher.
    both = rendered({"postStart": {"tcpSocket": {}}, "preStop": {"sleep": {"seconds": 1}}})
    assert set(json.loads(both.files[HOOKS_FILE])) == {"grace", "preStop"}


def test_an_init_container_has_hooks_only_as_a_sidecar() -> None:
    hook = {"postStart": {"exec": {"command": ["true"]}}}
    init = busybox("setup", command=["true"], lifecycle=hook)
    error = refused(pod("init", busybox("main", command=["true"]), initContainers=[init]))
    assert error.field == "spec.initContainers[0].lifecycle", error
    assert "sidecar" in str(error)
    sidecar = {**init, "restartPolicy": "Always"}
    result = render_pod(
        pod("init", busybox("main", command=["true"]), initContainers=[sidecar]), settings()
    )
    assert json.loads(result.files["hooks/setup"])["postStart"]["kind"] == "exec"


def test_an_srun_container_has_no_exec_hooks() -> None:
    srun = {"annotations": {"slurm.hpk.io/launcher": "srun"}}
    exec_hook = {"preStop": {"exec": {"command": ["true"]}}}
    error = refused(pod("mpi", busybox("main", command=["true"], lifecycle=exec_hook), **srun))
    assert error.field == "spec.containers[0].lifecycle.preStop.exec", error
    sleep_hook = {"preStop": {"sleep": {"seconds": 1}}}
    result = render_pod(
        pod("mpi", busybox("main", command=["true"], lifecycle=sleep_hook), **srun), settings()
    )
    assert HOOKS_FILE in result.files


def test_only_a_main_container_with_a_post_start_hook_holds_the_next_one_back() -> None:
    post_start = {"postStart": {"exec": {"command": ["true"]}}}
    the_pod = pod(
        "order",
        busybox("first", command=["true"], lifecycle=post_start),
        busybox("second", command=["true"], lifecycle={"preStop": {"sleep": {"seconds": 1}}}),
        busybox("third", command=["true"], lifecycle=post_start),
    )
    script = render_pod(the_pod, settings("order")).script
    assert 'await_started first "$!" ended' in script
    # The second has no postStart hook, and nothing comes after the third.
    assert "await_started second" not in script and "await_started third" not in script
