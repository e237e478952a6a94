"""`hpk addons install argo`: what it applies, in which order, and what it tells the user; with
kubectl faked at its one seam (the Kubectl it is given)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hpk import minio
from hpk.addons import (
    EXECUTOR_ROLE,
    AddonError,
    ArgoSettings,
    executor_rbac,
    install_argo,
    manifest_path,
    uninstall_argo,
)
from hpk.cli import build_parser
from hpk.home import HpkHome
from hpk.toolchain import Toolchain, read_pins

PINS = read_pins()
MANIFEST = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: workflows.argoproj.io
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: workflow-controller
spec:
  template:
    spec:
      containers:
        - name: workflow-controller
          image: quay.io/argoproj/workflow-controller:v{version}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: argo-server
"""


class FakeKubectl:
    """Records each call and answers `get pods` with one pod that has a Slurm job."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[tuple[str, ...], Any]] = []
        self.timeouts: list[float | None] = []
        self.fail_on = fail_on

    def __call__(self, *args: str, stdin: str | None = None, timeout: float | None = None) -> str:
        self.calls.append((args, json.loads(stdin) if stdin else None))
        self.timeouts.append(timeout)
        if self.fail_on and self.fail_on in args:
            raise AddonError(f"kubectl {' '.join(args)} failed: refused")
        if args[0] == "get":
            app = args[args.index("-l") + 1].removeprefix("app=")
            pod = {"metadata": {"name": f"{app}-1", "annotations": {"slurm.hpk.io/job-id": "42"}}}
            return json.dumps({"items": [pod]})
        if args[0] == "apply" and stdin:
            return "".join(
                f"{item['kind'].lower()} created\n" for item in json.loads(stdin)["items"]
            )
        return ""


def toolchain(tmp_path: Path, *, manifests: bool = True) -> Toolchain:
    tools = Toolchain(root=tmp_path / "tools", pins=PINS)
    folder = tools.component_dir("argo") / "manifests"
    folder.mkdir(parents=True)
    if manifests:
        text = MANIFEST.format(version=PINS["ARGO_VERSION"])
        (folder / "install.yaml").write_text(text)
        (folder / "namespace-install.yaml").write_text(text)
    return tools


def run_install(
    tmp_path: Path, settings: ArgoSettings, kubectl: FakeKubectl
) -> tuple[int, list[str]]:
    said: list[str] = []
    code = install_argo(
        settings,
        kubectl=kubectl,
        progress=said.append,
        toolchain=toolchain(tmp_path),
        home=HpkHome(tmp_path / "hpk"),
        import_images=lambda: {"quay.io/argoproj/argoexec:v1": tmp_path / "argoexec.sif"},
        import_minio=lambda: ("localhost/minio:1", tmp_path / "minio.sif"),
    )
    return code, said


def test_install_applies_the_manifest_then_the_rbac_then_waits(tmp_path: Path) -> None:
    kubectl = FakeKubectl()
    code, said = run_install(tmp_path, ArgoSettings(workflow_namespaces=("science",)), kubectl)
    assert code == 0
    verbs = [args[:2] if args[0] != "rollout" else args[:4] for args, _ in kubectl.calls]
    assert verbs == [
        ("apply", "-f"),  # the namespace
        ("apply", "-n"),  # upstream's objects, into it
        ("apply", "-f"),  # the executor's Role and the artifact repository in argo
        ("apply", "-f"),  # ... and in science
        ("apply", "-f"),  # MinIO
        ("rollout", "status", "-n", "argo"),
        ("get", "pods"),
        ("rollout", "status", "-n", "argo"),
        ("get", "pods"),
        ("rollout", "status", "-n", "argo"),
        ("get", "pods"),
    ]
    applied = kubectl.calls[1][1]["items"]
    assert [item["kind"] for item in applied] == [
        "CustomResourceDefinition",
        "Deployment",
        "Deployment",
    ]
    rollouts = [args[4] for args, _ in kubectl.calls if args[0] == "rollout"]
    assert rollouts == [
        "deployment/workflow-controller",
        "deployment/argo-server",
        "deployment/minio",
    ]
    # The wait may take the whole timeout: the call is not cut short before kubectl's own.
    for (args, _), timeout in zip(kubectl.calls, kubectl.timeouts, strict=True):
        if args[0] == "rollout":
            waits = int(args[5].removeprefix("--timeout=").removesuffix("s"))
            assert timeout is not None and timeout > waits
    science = kubectl.calls[3][1]["items"]
    assert [(item["kind"], item["metadata"]["name"]) for item in science] == [
        ("Namespace", "science"),
        ("Role", EXECUTOR_ROLE),
        ("RoleBinding", EXECUTOR_ROLE),
        ("Secret", minio.SECRET),
        ("ConfigMap", minio.REPOSITORIES),
    ]
    server = kubectl.calls[4][1]["items"]
    assert [(item["kind"], item["metadata"]["namespace"]) for item in server] == [
        ("Deployment", "argo"),
        ("Service", "argo"),
    ]
    assert server[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "localhost/minio:1"
    assert "  pod workflow-controller-1: Slurm job 42" in said
    assert any("argoexec" in line for line in said)
    assert said[-1].startswith("ready: submit workflows with ")


def test_no_artifacts_leaves_out_minio(tmp_path: Path) -> None:
    kubectl = FakeKubectl()
    code, said = run_install(tmp_path, ArgoSettings(artifacts=False), kubectl)
    assert code == 0
    applied = [item["kind"] for _, stdin in kubectl.calls if stdin for item in stdin["items"]]
    assert "Secret" not in applied
    assert "ConfigMap" not in applied
    assert not any("MinIO" in line for line in said)
    assert not (tmp_path / "hpk" / "artifacts").exists()


def test_spoilt_credentials_stop_the_install_with_the_fix(tmp_path: Path) -> None:
    store = HpkHome(tmp_path / "hpk").artifacts
    store.mkdir(parents=True)
    (store / "credentials").write_text("not json")
    kubectl = FakeKubectl()
    with pytest.raises(AddonError, match="remove it to make new ones"):
        run_install(tmp_path, ArgoSettings(), kubectl)
    assert not kubectl.calls


def test_the_executor_role_is_upstreams_minimum() -> None:
    role, binding = executor_rbac("science")
    assert role["rules"] == [
        {
            "apiGroups": ["argoproj.io"],
            "resources": ["workflowtaskresults"],
            "verbs": ["create", "patch"],
        }
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == EXECUTOR_ROLE
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "default", "namespace": "science"}
    ]


def test_the_install_namespace_is_named_once() -> None:
    settings = ArgoSettings(namespace="wf", workflow_namespaces=("wf", "x", "x"))
    assert settings.executor_namespaces() == ("wf", "x")


def test_namespaced_picks_the_namespace_install(tmp_path: Path) -> None:
    tools = toolchain(tmp_path)
    namespaced = ArgoSettings(namespace="science", namespaced=True)
    assert manifest_path(tools, namespaced).name == "namespace-install.yaml"
    assert manifest_path(tools, ArgoSettings()).name == "install.yaml"


def test_the_cluster_install_stays_in_its_namespace(tmp_path: Path) -> None:
    with pytest.raises(AddonError, match="--namespaced"):
        manifest_path(toolchain(tmp_path), ArgoSettings(namespace="science"))


def test_a_missing_manifest_says_how_to_make_it(tmp_path: Path) -> None:
    tools = toolchain(tmp_path, manifests=False)
    with pytest.raises(AddonError, match=r"build-toolchain\.sh"):
        manifest_path(tools, ArgoSettings())


def test_a_refused_apply_stops_before_waiting(tmp_path: Path) -> None:
    kubectl = FakeKubectl(fail_on="-n")
    with pytest.raises(AddonError, match="refused"):
        run_install(tmp_path, ArgoSettings(), kubectl)
    assert not [args for args, _ in kubectl.calls if args[0] == "rollout"]


def test_uninstall_deletes_the_rbac_and_the_manifest(tmp_path: Path) -> None:
    kubectl = FakeKubectl()
    uninstall_argo(
        ArgoSettings(), kubectl=kubectl, progress=lambda _: None, toolchain=toolchain(tmp_path)
    )
    assert [args[:2] for args, _ in kubectl.calls] == [("delete", "--ignore-not-found")] * 3
    assert [item["kind"] for item in kubectl.calls[0][1]["items"]] == [
        "Role",
        "RoleBinding",
        "Secret",
        "ConfigMap",
    ]
    assert [item["kind"] for item in kubectl.calls[1][1]["items"]] == ["Deployment", "Service"]
    assert len(kubectl.calls[2][1]["items"]) == 3


def test_the_cli_takes_the_addon_and_its_namespaces() -> None:
    args = build_parser().parse_args(
        ["addons", "install", "argo", "--workflow-namespace", "a", "--workflow-namespace", "b"]
    )
    assert (args.action, args.addon, args.namespace) == ("install", "argo", "argo")
    assert args.workflow_namespace == ["a", "b"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["addons", "install", "spark"])
