"""What a pod reads from ConfigMaps and Secrets: resolved through an injected lookup, then
rendered into env files and volume binds, and written into the pod folder by the provider."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kubelet_py.adapters.apiserver import WatchEvent
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.pod.inputs import (
    MissingReference,
    PodInputs,
    VolumeFile,
    key_problem,
    path_problem,
    resolve,
)
from kubelet_py.pod.render import render_pod
from tests.unit.fakes import (
    READ_BACK,
    Bed,
    SlurmKit,
    busybox,
    launches,
    make_pod,
    pod,
    settings,
    until,
)

TRICKY = 'it\'s "q" $HOME $(A) `id` {"j": [1]}\nline two ✓ 🚀'


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


OBJECTS: dict[tuple[str, str], dict[str, Any]] = {
    ("ConfigMap", "app"): {
        "data": {"greeting": "hello", "run.sh": "echo run\n", "tricky": TRICKY, "bad.key": "x"},
        "binaryData": {"blob": b64("\x00\x01binary")},
    },
    ("Secret", "creds"): {"data": {"password": b64(TRICKY), "token": b64("t0k")}},
}


class Lookup:
    """The injected lookup: OBJECTS in namespace default; records each call."""

    def __init__(self, objects: Mapping[tuple[str, str], dict[str, Any]] = OBJECTS) -> None:
        self.objects = dict(objects)
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        self.calls.append((kind, namespace, name))
        return self.objects.get((kind, name)) if namespace == "default" else None


def env_pod(*env: dict[str, Any], env_from: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    container = busybox("main", command=["true"], env=list(env))
    if env_from is not None:
        container["envFrom"] = env_from
    return pod("p", container, serviceAccountName="runner", nodeName="hpk-batch")


def key_ref(kind: str, name: str, key: str, **extra: Any) -> dict[str, Any]:
    return {kind: {"name": name, "key": key, **extra}}


def environment(the_pod: dict[str, Any], lookup: Lookup | None = None) -> dict[str, str]:
    """The container's variables, read back from its env file as Apptainer would."""
    inputs = resolve(the_pod, lookup or Lookup())
    content = render_pod(the_pod, settings(), inputs=inputs).files.get("env/main", "")
    names = [line.split("=", 1)[0] for line in content.splitlines()[1:] if "=" in line]
    names = [name for name in names if name.isidentifier()]
    result = subprocess.run(
        ["bash", "-c", READ_BACK, "_", *names],
        input=content,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8"},
    )
    return dict(zip(names, result.stdout.split("\0")[:-1], strict=True))


# -- environment --------------------------------------------------------------------------


def test_key_refs_reach_the_env_file_byte_for_byte_and_unexpanded() -> None:
    found = environment(
        env_pod(
            {"name": "A", "value": "a"},
            {"name": "FROM_CM", "valueFrom": key_ref("configMapKeyRef", "app", "tricky")},
            {"name": "FROM_SECRET", "valueFrom": key_ref("secretKeyRef", "creds", "password")},
            {"name": "EXPANDED", "value": "<$(FROM_CM)>"},
        )
    )
    # Kubernetes expands `value` entries only: the referenced values stay as they are.
    assert found["FROM_CM"] == TRICKY
    assert found["FROM_SECRET"] == TRICKY
    assert found["EXPANDED"] == f"<{TRICKY}>"


def test_env_from_comes_first_with_its_prefix_and_env_wins() -> None:
    the_pod = env_pod(
        {"name": "CM_greeting", "value": "from env"},
        {"name": "LATER", "value": "$(CM_greeting) $(S_token)"},
        env_from=[
            {"configMapRef": {"name": "app"}, "prefix": "CM_"},
            {"secretRef": {"name": "creds"}, "prefix": "S_"},
        ],
    )
    found = environment(the_pod)
    assert found["CM_greeting"] == "from env"
    assert found["CM_tricky"] == TRICKY
    assert found["S_password"] == TRICKY
    assert found["LATER"] == "from env t0k"
    # A key that is no variable name is left out, as Kubernetes does, and said.
    assert "CM_bad.key" not in found and "CM_run.sh" not in found
    rendered = render_pod(the_pod, settings(), inputs=resolve(the_pod, Lookup()))
    assert [reason for reason, message in rendered.warnings if "'CM_bad.key'" in message] == [
        "InvalidEnvironmentVariableNames"
    ]


def test_optional_references_that_are_missing_leave_the_variable_unset() -> None:
    found = environment(
        env_pod(
            {"name": "NO_KEY", "valueFrom": key_ref("configMapKeyRef", "app", "x", optional=True)},
            {"name": "NO_CM", "valueFrom": key_ref("configMapKeyRef", "gone", "x", optional=True)},
            {"name": "KEPT", "value": "$(NO_KEY)"},
            env_from=[{"secretRef": {"name": "gone", "optional": True}}],
        )
    )
    assert found == {"KEPT": "$(NO_KEY)"}


@pytest.mark.parametrize(
    ("entry", "env_from", "field", "problem"),
    [
        (
            {"name": "X", "valueFrom": key_ref("configMapKeyRef", "gone", "k")},
            None,
            "spec.containers[0].env[0].valueFrom.configMapKeyRef",
            'ConfigMap "default/gone" not found',
        ),
        (
            {"name": "X", "valueFrom": key_ref("secretKeyRef", "creds", "nope")},
            None,
            "spec.containers[0].env[0].valueFrom.secretKeyRef",
            'key "nope" not found in Secret "default/creds"',
        ),
        (
            None,
            [{"configMapRef": {"name": "gone"}}],
            "spec.containers[0].envFrom[0]",
            'ConfigMap "default/gone" not found',
        ),
    ],
)
def test_a_missing_reference_is_a_typed_error_naming_object_and_key(
    entry: dict[str, Any] | None, env_from: list[dict[str, Any]] | None, field: str, problem: str
) -> None:
    with pytest.raises(MissingReference) as caught:
        resolve(env_pod(*([entry] if entry else []), env_from=env_from), Lookup())
    assert caught.value.field == field
    assert str(caught.value) == f"{field}: {problem}"
    assert caught.value.reason == "CreateContainerConfigError"


def test_each_object_is_looked_up_once() -> None:
    lookup = Lookup()
    resolve(
        env_pod(
            {"name": "A", "valueFrom": key_ref("configMapKeyRef", "app", "greeting")},
            {"name": "B", "valueFrom": key_ref("configMapKeyRef", "app", "tricky")},
            env_from=[{"configMapRef": {"name": "app"}}],
        ),
        lookup,
    )
    assert lookup.calls == [("ConfigMap", "default", "app")]


def test_values_no_process_can_receive_are_refused() -> None:
    lookup = Lookup({("Secret", "bin"): {"data": {"k": b64("a\x00b")}}})
    the_pod = env_pod({"name": "X", "valueFrom": key_ref("secretKeyRef", "bin", "k")})
    with pytest.raises(InvalidPodSpec, match="NUL"):
        resolve(the_pod, lookup)


def test_field_refs_read_the_pod() -> None:
    found = environment(
        env_pod(
            *(
                {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
                for name, path in [
                    ("NAME", "metadata.name"),
                    ("NAMESPACE", "metadata.namespace"),
                    ("POD_UID", "metadata.uid"),
                    ("NODE", "spec.nodeName"),
                    ("SA", "spec.serviceAccountName"),
                ]
            )
        )
    )
    assert found == {
        "NAME": "p",
        "NAMESPACE": "default",
        "POD_UID": "5f0c8a9e-1d2b-4c3d-8e4f-123456789abc",
        "NODE": "hpk-batch",
        "SA": "runner",
    }


def test_pod_and_host_ip_are_set_where_the_job_runs() -> None:
    the_pod = env_pod(
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
    )
    rendered = render_pod(the_pod, settings(node_addresses={"n1": "10.0.0.1"}))
    assert "env/main" not in rendered.files
    words = launches(rendered)["main"]
    assert words[words.index("--env") + 1] == "POD_IP=$pod_ip"
    assert words[words.index("--env", words.index("--env") + 1) + 1] == "HOST_IP=$node_ip"
    script = rendered.script
    assert "n1) node_ip=10.0.0.1 ;;" in script
    table = script[script.index("case ") : script.index("pod_ip=$node_ip") + 15]
    result = subprocess.run(
        ["bash", "-c", table + ' && echo "$node_ip $pod_ip"'],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"], "SLURMD_NODENAME": "n1"},
    )
    assert result.stdout == "10.0.0.1 10.0.0.1\n"  # off the pod network, podIP is the node's


@pytest.mark.parametrize(
    ("resources", "resource", "divisor", "value"),
    [
        ({"requests": {"cpu": "250m"}}, "requests.cpu", None, "1"),
        ({"requests": {"cpu": "250m"}}, "requests.cpu", "1m", "250"),
        ({"limits": {"cpu": "2"}}, "requests.cpu", None, "2"),
        ({"requests": {"memory": "64Mi"}}, "limits.memory", "1Mi", "64"),
        ({"limits": {"memory": "1Gi"}}, "limits.memory", None, "1073741824"),
        ({"limits": {"memory": "1G"}}, "limits.memory", "1Mi", "954"),
        ({}, "requests.memory", None, "0"),
    ],
)
def test_resource_field_refs(
    resources: dict[str, Any], resource: str, divisor: str | None, value: str
) -> None:
    ref: dict[str, Any] = {"resource": resource, **({"divisor": divisor} if divisor else {})}
    the_pod = env_pod({"name": "R", "valueFrom": {"resourceFieldRef": ref}})
    the_pod["spec"]["containers"][0]["resources"] = resources
    assert environment(the_pod) == {"R": value}


# -- volumes ------------------------------------------------------------------------------


def volume_pod(*volumes: dict[str, Any], mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return pod("v", busybox("main", volumeMounts=mounts), volumes=list(volumes))


def test_volume_files_with_items_modes_and_narrowed_secret_modes() -> None:
    inputs = resolve(
        volume_pod(
            {
                "name": "config",
                "configMap": {
                    "name": "app",
                    "defaultMode": 0o640,
                    "items": [
                        {"key": "run.sh", "path": "run.sh", "mode": 0o755},
                        {"key": "blob", "path": "data/blob"},
                    ],
                },
            },
            {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o444}},
            {
                "name": "one",
                "secret": {
                    "secretName": "creds",
                    "items": [{"key": "token", "path": "t", "mode": 0o600}],
                },
            },
            mounts=[],
        ),
        Lookup(),
    )
    assert inputs.volumes["config"] == (
        VolumeFile(path="run.sh", data=b"echo run\n", mode=0o755),
        VolumeFile(path="data/blob", data=b"\x00\x01binary", mode=0o640),
    )
    assert inputs.volumes["creds"] == (
        VolumeFile(path="password", data=TRICKY.encode(), mode=0o400),
        VolumeFile(path="token", data=b"t0k", mode=0o400),
    )
    assert inputs.volumes["one"] == (VolumeFile(path="t", data=b"t0k", mode=0o600),)
    assert inputs.secret_volumes == {"creds", "one"}


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"configMap": {"name": "gone"}}, "spec.volumes[0].configMap"),
        ({"secret": {"secretName": "gone"}}, "spec.volumes[0].secret"),
        (
            {"configMap": {"name": "app", "items": [{"key": "nope", "path": "x"}]}},
            "spec.volumes[0].configMap.items[0].key",
        ),
    ],
)
def test_missing_volume_sources(source: dict[str, Any], field: str) -> None:
    the_pod = volume_pod({"name": "x", **source}, mounts=[])
    with pytest.raises(MissingReference) as caught:
        resolve(the_pod, Lookup())
    assert caught.value.field == field
    optional = {kind: {**ref, "optional": True} for kind, ref in source.items()}
    assert resolve(volume_pod({"name": "x", **optional}, mounts=[]), Lookup()).volumes["x"] == ()


@pytest.mark.parametrize(
    ("item", "field", "problem"),
    [
        ({"key": "greeting", "path": "../up"}, "items[0].path", "inside the volume"),
        ({"key": "greeting", "path": "/abs"}, "items[0].path", "inside the volume"),
        ({"key": "greeting", "path": "."}, "items[0].path", "inside the volume"),
        ({"key": "greeting", "path": "p", "mode": 0o1777}, "items[0].mode", "file mode"),
        ({"key": "greeting", "path": ""}, "items[0].path", "not empty"),
        ({"key": "greeting", "path": 7}, "items[0].path", "inside the volume"),
        ({"key": "greeting", "path": "a/../../b"}, "items[0].path", "without '..'"),
        ({"key": "greeting", "path": "a/.."}, "items[0].path", "without '..'"),
        ({"key": "greeting", "path": "..data"}, "items[0].path", "must not start with '..'"),
        ({"key": "greeting", "path": "..."}, "items[0].path", "must not start with '..'"),
        ({"key": "greeting", "path": "./"}, "items[0].path", "not the volume itself"),
        ({"key": "greeting", "path": "a\0b"}, "items[0].path", "without NUL"),
        ({"key": "greeting", "path": "x" * 256}, "items[0].path", "longer than 255 bytes"),
        ({"key": "greeting", "path": "é" * 128}, "items[0].path", "longer than 255 bytes"),
        ({"key": "greeting", "path": "a/" * 2049}, "items[0].path", "longer than 4096"),
    ],
)
def test_bad_items_are_refused(item: dict[str, Any], field: str, problem: str) -> None:
    the_pod = volume_pod({"name": "x", "configMap": {"name": "app", "items": [item]}}, mounts=[])
    with pytest.raises(InvalidPodSpec, match=problem) as caught:
        resolve(the_pod, Lookup())
    assert caught.value.field == f"spec.volumes[0].configMap.{field}"


@pytest.mark.parametrize(
    ("path", "written"),
    [
        ("a..b", "a..b"),
        ("dir/..hidden", "dir/..hidden"),
        ("./a/./b", "a/b"),
        ("a//b/", "a/b"),
        (".env", ".env"),
        ("x" * 255, "x" * 255),
    ],
)
def test_item_paths_kubernetes_accepts_are_written_clean(path: str, written: str) -> None:
    source = {"configMap": {"name": "app", "items": [{"key": "greeting", "path": path}]}}
    inputs = resolve(volume_pod({"name": "x", **source}, mounts=[]), Lookup())
    assert [file.path for file in inputs.volumes["x"]] == [written]


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("../../.bashrc", "must be letters, digits"),
        ("a/b", "must be letters, digits"),
        ("/etc/passwd", "must be letters, digits"),
        ("..", "may not start with '..'"),
        ("..data", "may not start with '..'"),
        (".", "may not be '.'"),
        ("with space", "must be letters, digits"),
        ("k" * 254, "is longer than 253"),
    ],
)
@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"configMap": {"name": "odd"}}, "spec.volumes[0].configMap"),
        ({"secret": {"secretName": "odd"}}, "spec.volumes[0].secret"),
    ],
)
def test_a_misnamed_key_of_a_whole_object_volume_fails_the_pod(
    key: str, problem: str, source: dict[str, Any], field: str
) -> None:
    # The API server never stores such a key; were one to arrive, no file is made of it.
    data = {"fine": b64("ok"), key: b64("x")}
    objects = {("ConfigMap", "odd"): {"data": data}, ("Secret", "odd"): {"data": data}}
    the_pod = volume_pod({"name": "x", **source}, mounts=[])
    with pytest.raises(InvalidPodSpec) as caught:
        resolve(the_pod, Lookup(objects))
    assert caught.value.field == field
    assert f"key {key!r} {problem}" in caught.value.problem
    assert "the volume is not written" in caught.value.problem


def test_a_misnamed_key_left_out_by_items_is_no_file_and_no_error() -> None:
    objects = {("ConfigMap", "odd"): {"data": {"fine": "ok", "../x": "no"}}}
    source = {"configMap": {"name": "odd", "items": [{"key": "fine", "path": "f"}]}}
    inputs = resolve(volume_pod({"name": "x", **source}, mounts=[]), Lookup(objects))
    assert inputs.volumes["x"] == (VolumeFile(path="f", data=b"ok", mode=0o644),)


@pytest.mark.parametrize(
    "key", ["a", "run.sh", "-x", "_y", ".env", "a..b", "A-Z_0.9", "k" * 253, "a.."]
)
def test_keys_kubernetes_stores_are_file_names(key: str) -> None:
    assert key_problem(key) is None


@pytest.mark.parametrize("path", ["a", "a/b/c", "a..b", "x/..y", ".a", "a/./b"])
def test_paths_kubernetes_accepts(path: str) -> None:
    assert path_problem(path) is None


def test_config_volumes_are_bound_read_only_and_not_created_by_the_script() -> None:
    the_pod = volume_pod(
        {"name": "config", "configMap": {"name": "app"}},
        {"name": "creds", "secret": {"secretName": "creds"}},
        mounts=[
            {"name": "config", "mountPath": "/config"},
            {"name": "config", "mountPath": "/etc/greeting", "subPath": "greeting"},
            {"name": "creds", "mountPath": "/creds", "readOnly": False},
        ],
    )
    rendered = render_pod(the_pod, settings("v"), inputs=resolve(the_pod, Lookup()))
    words = launches(rendered)["main"]
    binds = [words[i + 1] for i, word in enumerate(words) if word == "--bind"]
    assert [bind.split(":")[1] for bind in binds[:2]] == [
        "/.hpk-ready",
        "/.singularity.d/env/00-hpk-ready.sh",
    ]
    del binds[:2]
    folder = "/home/alice/.hpk/pods/default/v/volumes"
    assert binds == [
        f"{folder}/config:/config:ro",
        f"{folder}/config/greeting:/etc/greeting:ro",
        f"{folder}/creds:/creds:ro",
    ]
    assert 'mkdir -p -- "$containers" || exit 125' in rendered.script


def test_a_sub_path_must_name_a_file_of_the_volume() -> None:
    the_pod = volume_pod(
        {"name": "config", "configMap": {"name": "app"}},
        mounts=[{"name": "config", "mountPath": "/x", "subPath": "nope"}],
    )
    with pytest.raises(InvalidPodSpec, match="not a file of volume config") as caught:
        render_pod(the_pod, settings("v"), inputs=resolve(the_pod, Lookup()))
    assert caught.value.field == "spec.containers[0].volumeMounts[0].subPath"


def test_rendering_without_resolved_inputs_is_the_callers_error() -> None:
    the_pod = env_pod({"name": "A", "valueFrom": key_ref("configMapKeyRef", "app", "greeting")})
    with pytest.raises(ValueError, match="not resolved"):
        render_pod(the_pod, settings(), inputs=PodInputs())
    volumes = volume_pod({"name": "c", "configMap": {"name": "app"}}, mounts=[])
    with pytest.raises(ValueError, match="volume c: its ConfigMap or Secret was not resolved"):
        render_pod(volumes, settings(), inputs=PodInputs())


# -- the provider writes them -------------------------------------------------------------


def test_provider_writes_volume_files_and_env_before_submitting(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    bed.provider.lookup = Lookup()
    the_pod = make_pod()
    container = the_pod["spec"]["containers"][0]
    container["env"] = [{"name": "P", "valueFrom": key_ref("secretKeyRef", "creds", "password")}]
    container["volumeMounts"] = [{"name": "creds", "mountPath": "/creds"}]
    the_pod["spec"]["volumes"] = [
        {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o777}},
        {
            "name": "config",
            "configMap": {"name": "app", "items": [{"key": "run.sh", "path": "bin/run.sh"}]},
        },
    ]
    bed.provider.create_pod(the_pod, partition="batch")
    folder = bed.folder()
    secret = folder / "volumes" / "creds"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o700
    assert (secret / "password").read_bytes() == TRICKY.encode()
    assert stat.S_IMODE((secret / "password").stat().st_mode) == 0o600
    run = folder / "volumes" / "config" / "bin" / "run.sh"
    assert run.read_text() == "echo run\n"
    assert stat.S_IMODE(run.stat().st_mode) == 0o644
    assert stat.S_IMODE((folder / "env" / "main").stat().st_mode) == 0o600
    assert TRICKY not in (folder / "job.sh").read_text()
    assert len(bed.slurm.submitted) == 1


def test_provider_submits_nothing_while_a_reference_is_missing(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    lookup = Lookup({})
    bed.provider.lookup = lookup
    the_pod = make_pod()
    the_pod["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": "app"}}]
    with pytest.raises(MissingReference):
        bed.provider.create_pod(the_pod, partition="batch")
    assert bed.slurm.submitted == []
    assert not (bed.folder() / "job.sh").exists()
    lookup.objects = dict(OBJECTS)
    bed.provider.create_pod(the_pod, partition="batch")
    assert len(bed.slurm.submitted) == 1


def test_the_settings_hold_only_plain_addresses() -> None:
    with pytest.raises(ValueError, match="node_addresses"):
        settings(node_addresses={"n1": "10.0.0.1\n"})
    assert settings(node_addresses={"n1": "1.2.3.4"}).node_addresses == {"n1": "1.2.3.4"}


def test_the_address_table_is_only_for_pods_that_read_it(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    bed.provider.settings.node_addresses["n1"] = "10.0.0.1"  # type: ignore[index]
    plain = make_pod("plain", uid="plain-uid")
    reads = make_pod("reads", uid="reads-uid")
    reads["spec"]["containers"][0]["env"] = [
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
    ]
    bed.provider.create_pod(plain, partition="batch")
    bed.provider.create_pod(reads, partition="batch")
    assert "node_ip" not in (bed.folder("plain") / "job.sh").read_text()
    script = (bed.folder("reads") / "job.sh").read_text()
    assert "n1) node_ip=10.0.0.1 ;;" in script
    assert '--env HOST_IP="$node_ip"' in script


def test_a_secret_expanded_into_the_command_line_is_warned_of() -> None:
    def warnings(container: dict[str, Any], env_from: list[dict[str, Any]] | None = None) -> list:
        the_pod = env_pod(*container.pop("env", []), env_from=env_from)
        the_pod["spec"]["containers"][0].update(container)
        rendered = render_pod(the_pod, settings(), inputs=resolve(the_pod, Lookup()))
        return [message for reason, message in rendered.warnings if reason == "SecretInArguments"]

    token = {"name": "TOKEN", "valueFrom": key_ref("secretKeyRef", "creds", "token")}
    (found,) = warnings({"env": [token], "args": ["--token=$(TOKEN)"]})
    assert found.startswith("spec.containers[0].args[0] expands TOKEN from a Secret")
    # Through another variable, and from envFrom.
    indirect = {"name": "HEADER", "value": "Bearer $(TOKEN)"}
    (found,) = warnings({"env": [token, indirect], "command": ["curl", "-H", "$(HEADER)"]})
    assert found.startswith("spec.containers[0].command[2] expands HEADER")
    assert warnings({"args": ["$(token)"]}, env_from=[{"secretRef": {"name": "creds"}}])
    # Not for a ConfigMap's value, an escaped reference, or a Secret kept in the environment.
    greeting = {"name": "G", "valueFrom": key_ref("configMapKeyRef", "app", "greeting")}
    assert warnings({"env": [greeting], "args": ["$(G)"]}) == []
    assert warnings({"env": [token], "args": ["$$(TOKEN)", "uses $TOKEN"]}) == []


# -- behind the controller ----------------------------------------------------------------


@pytest.fixture
def kit(tmp_path: Path) -> SlurmKit:
    return SlurmKit(tmp_path)


def test_env_from_keys_that_are_no_names_are_left_out_with_a_warning(kit: SlurmKit) -> None:
    kit.bed.provider.lookup = lambda kind, namespace, name: {"data": {"ok": "1", "no.name": "2"}}
    the_pod = make_pod("keys", uid="keys-uid")
    the_pod["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": "app"}}]
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", the_pod))
        until("the Warning", lambda: [e for e in kit.api.of("event") if e[1] == "Warning"])
    assert [e for e in kit.api.of("event") if e[1] == "Warning"] == [
        ("keys", "Warning", "InvalidEnvironmentVariableNames")
    ]
    env = (kit.bed.folder("keys") / "env" / "main").read_text()
    assert "ok=1" in env.splitlines()
    assert "no.name" not in env
    assert len(kit.bed.slurm.submitted) == 1
