"""Add-ons a user installs into a running hpk cluster: `hpk addons install argo` and
`hpk addons install metrics-server`.

Argo Workflows goes in as a site without a registry would install it: its images, made from
the pinned binaries (hpk.argo), are imported into the user's image cache, and its standard
install manifest, which the toolchain generated from the pinned module as upstream's release
does, is applied with `kubectl apply` as upstream ships it: nothing in it needs changing for
hpk. Beside it hpk adds the executor's RBAC in the namespaces workflows run in, which
upstream leaves to the user.

metrics-server goes in with objects of hpk's own (hpk.metrics_server says why each differs
from upstream's): its image from the pinned binary, its certificates from the cluster CA as
Secrets, its rights, its Deployment on its node's network, its Service and its APIService.

This module may run kubectl (through the `Kubectl` it is given) and touch the image cache;
it does not import the Kubernetes client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from hpk import metrics_server, minio
from hpk.argo import import_argo_images
from hpk.home import HpkHome
from hpk.images import ImageError
from hpk.metrics_server import MetricsServerError, MetricsServerSettings
from hpk.minio import ArtifactStore, ArtifactStoreError
from hpk.pki import ClusterPKI, PKIError
from hpk.toolchain import Toolchain, ToolchainMissing

Progress = Callable[[str], None]
Manifest = dict[str, Any]

CLUSTER_INSTALL_NAMESPACE = "argo"
"""The namespace upstream's install.yaml puts its objects in (and names in its bindings)."""
EXECUTOR_ROLE = "hpk-argo-executor"
"""The Role (and RoleBinding) hpk adds so that each step's wait container may report its
outputs: upstream's minimum for the executor since 3.4."""


class AddonError(RuntimeError):
    """An add-on could not be installed; the message says what failed and what to do."""


class Kubectl(Protocol):
    """Runs kubectl against the user's cluster."""

    def __call__(self, *args: str, stdin: str | None = None, timeout: float | None = None) -> str:
        """kubectl's stdout; raises AddonError with its stderr when it fails, or when it has
        not ended after `timeout` seconds (None: the runner's default)."""
        ...


def default_kubectl() -> str:
    """The tool folder's kubectl, else the one on PATH."""
    try:
        return str(Toolchain.load().binary("kubectl"))
    except ToolchainMissing:
        found = shutil.which("kubectl")
        if found is None:
            raise AddonError("no kubectl: build the toolchain or put kubectl on PATH") from None
        return found


@dataclass(frozen=True)
class KubectlCommand:
    """The pinned kubectl of the tool folder (else the one on PATH) with a kubeconfig."""

    kubeconfig: Path
    binary: str = field(default_factory=default_kubectl)
    timeout: float = 120

    def __call__(self, *args: str, stdin: str | None = None, timeout: float | None = None) -> str:
        argv = [self.binary, f"--kubeconfig={self.kubeconfig}", *args]
        limit = self.timeout if timeout is None else timeout
        try:
            result = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=limit, check=False
            )
        except subprocess.TimeoutExpired as error:
            raise AddonError(f"kubectl {' '.join(args)}: no answer in {limit:.0f} s") from error
        if result.returncode != 0:
            raise AddonError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout


@dataclass(frozen=True)
class ArgoSettings:
    """How `hpk addons install argo` installs Argo Workflows."""

    namespace: str = "argo"
    """Where the workflow-controller and the argo-server run. Upstream's cluster install names
    the namespace argo in its objects, so another one needs `namespaced`."""
    namespaced: bool = False
    """Upstream's namespace install (the controller sees only its own namespace) instead of
    its cluster install."""
    workflow_namespaces: tuple[str, ...] = ()
    """Namespaces whose `default` service account gets the executor's Role; the install
    namespace is always one."""
    artifacts: bool = True
    """Also run MinIO and make it the default artifact repository of those namespaces
    (hpk.minio); False for a site that brings its own."""
    timeout: float = 300
    """Seconds to wait for the controller and the server to be available."""

    def executor_namespaces(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.namespace, *self.workflow_namespaces)))


def manifest_path(toolchain: Toolchain, settings: ArgoSettings) -> Path:
    """The install manifest the toolchain generated for the pinned release."""
    if not settings.namespaced and settings.namespace != CLUSTER_INSTALL_NAMESPACE:
        raise AddonError(
            f"upstream's cluster install lives in the namespace {CLUSTER_INSTALL_NAMESPACE}; "
            f"to install into {settings.namespace}, add --namespaced (the namespace install)"
        )
    name = "namespace-install.yaml" if settings.namespaced else "install.yaml"
    path = toolchain.component_dir("argo") / "manifests" / name
    if not path.is_file():
        raise AddonError(
            f"{path} is missing: Argo's install manifests are made by the toolchain build; "
            f"run: rm {toolchain.component_dir('argo')}/.complete && "
            "bash container/build-toolchain.sh"
        )
    return path


def load_manifest(path: Path) -> list[Manifest]:
    """The objects of a multi-document YAML file, in order."""
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def executor_rbac(namespace: str) -> list[Manifest]:
    """The executor's Role in `namespace`, bound to the namespace's default service account."""
    labels = {"app.kubernetes.io/managed-by": "hpk", "app.kubernetes.io/part-of": "argo"}
    meta = {"name": EXECUTOR_ROLE, "namespace": namespace, "labels": labels}
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [
                {
                    "apiGroups": ["argoproj.io"],
                    "resources": ["workflowtaskresults"],
                    "verbs": ["create", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": EXECUTOR_ROLE,
            },
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
        },
    ]


def namespace_object(name: str) -> Manifest:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def _as_list(objects: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})


def deployments(objects: Iterable[Manifest]) -> list[str]:
    return [item["metadata"]["name"] for item in objects if item.get("kind") == "Deployment"]


def install_argo(
    settings: ArgoSettings,
    *,
    kubectl: Kubectl,
    progress: Progress,
    toolchain: Toolchain | None = None,
    home: HpkHome | None = None,
    import_images: Callable[[], Mapping[str, Path]] | None = None,
    import_minio: Callable[[], tuple[str, Path]] | None = None,
) -> int:
    """Import Argo's images, apply its install manifest and the executor's RBAC, set up the
    artifact repository (unless `settings.artifacts` is False), and wait for the Deployments;
    safe to repeat. Raises AddonError."""
    tools = toolchain or Toolchain.load()
    version = tools.pins["ARGO_VERSION"]
    path = manifest_path(tools, settings)
    objects = load_manifest(path)

    progress(f"Argo Workflows v{version}: images into the image cache")
    imported = (import_images or (lambda: import_argo_images(toolchain=tools, skip_cached=True)))()
    for reference, image in sorted(imported.items()):
        progress(f"  {reference} -> {image}")
    server: list[Manifest] = []
    credentials = None
    if settings.artifacts:
        store = ArtifactStore((home or HpkHome.default()).artifacts)
        try:
            credentials = store.ensure()
        except (ArtifactStoreError, OSError) as error:
            raise AddonError(f"the artifact store in {store.root}: {error}") from error
        progress(f"MinIO {tools.pins['MINIO_VERSION']}: the artifact repository's S3 server")
        reference, image = (import_minio or (lambda: minio.import_minio_image(toolchain=tools)))()
        progress(f"  {reference} -> {image}")
        progress(f"  its data: {store.data}")
        server = minio.server(settings.namespace, image=reference, store=store)

    progress(f"namespace {settings.namespace}: {path.name}, {len(objects)} objects")
    kubectl("apply", "-f", "-", stdin=_as_list([namespace_object(settings.namespace)]))
    for line in kubectl(
        "apply", "-n", settings.namespace, "-f", "-", stdin=_as_list(objects)
    ).splitlines():
        progress(f"  {line}")
    for namespace in settings.executor_namespaces():
        progress(f"namespace {namespace}: the executor's Role for the default service account")
        rbac = [namespace_object(namespace), *executor_rbac(namespace)]
        if credentials is not None:
            progress(f"  and the default artifact repository, {minio.endpoint(settings.namespace)}")
            rbac += minio.namespace_objects(
                namespace, install_namespace=settings.namespace, credentials=credentials
            )
        kubectl("apply", "-f", "-", stdin=_as_list(rbac))
    if server:
        kubectl("apply", "-f", "-", stdin=_as_list(server))

    deadline = time.monotonic() + settings.timeout
    for name in deployments([*objects, *server]):
        left = max(1, int(deadline - time.monotonic()))
        progress(f"waiting for deployment/{name} (each pod is a Slurm job)")
        kubectl(
            "rollout",
            "status",
            "-n",
            settings.namespace,
            f"deployment/{name}",
            f"--timeout={left}s",
            timeout=left + 30,  # kubectl's own --timeout ends it first
        )
        for pod, job in _pod_jobs(kubectl, settings.namespace, app=name):
            progress(f"  pod {pod}: Slurm job {job}")
    argo = tools.component_dir("argo") / "bin" / "argo"
    progress(f"ready: submit workflows with {argo} submit -n {settings.namespace} --watch FILE")
    return 0


def uninstall_argo(
    settings: ArgoSettings,
    *,
    kubectl: Kubectl,
    progress: Progress,
    toolchain: Toolchain | None = None,
) -> int:
    """Delete what `install_argo` applied (the images stay in the cache, the artifacts in
    the user's hpk folder)."""
    tools = toolchain or Toolchain.load()
    objects = load_manifest(manifest_path(tools, settings))
    store = ArtifactStore(Path())  # only the objects' names matter for their deletion
    no_keys = minio.Credentials("", "")
    for namespace in settings.executor_namespaces():
        owned = executor_rbac(namespace)
        if settings.artifacts:
            owned += minio.namespace_objects(
                namespace, install_namespace=settings.namespace, credentials=no_keys
            )
        kubectl("delete", "--ignore-not-found", "-f", "-", stdin=_as_list(owned))
    if settings.artifacts:
        server = minio.server(settings.namespace, image="", store=store)
        progress(f"deleting MinIO from namespace {settings.namespace} (its data stays)")
        kubectl("delete", "--ignore-not-found", "-f", "-", stdin=_as_list(server))
    progress(f"deleting {len(objects)} objects from namespace {settings.namespace}")
    kubectl(
        "delete", "--ignore-not-found", "-n", settings.namespace, "-f", "-", stdin=_as_list(objects)
    )
    return 0


def install_metrics_server(
    *,
    kubectl: Kubectl,
    progress: Progress,
    home: HpkHome | None = None,
    toolchain: Toolchain | None = None,
    settings: MetricsServerSettings | None = None,
    import_image: Callable[[], tuple[str, Path]] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Import metrics-server's image, issue its certificates, apply its objects, and wait
    until its Deployment is available and the API server serves metrics.k8s.io; safe to
    repeat. Raises AddonError."""
    hpk_home = home or HpkHome.default()
    tools = toolchain or Toolchain.load()
    try:
        chosen = settings or MetricsServerSettings(port=metrics_server.chosen_port(hpk_home))
        pki = ClusterPKI(hpk_home.pki)
        serving, client = metrics_server.ensure_certificates(pki)
    except (MetricsServerError, PKIError, OSError) as error:
        raise AddonError(str(error)) from error
    version = tools.pins["METRICS_SERVER_VERSION"]
    progress(f"metrics-server v{version}: image into the image cache")
    reference, image = (
        import_image or (lambda: metrics_server.import_metrics_server_image(toolchain=tools))
    )()
    progress(f"  {reference} -> {image}")
    objects = metrics_server.manifests(
        chosen, image=reference, ca=pki.ca.cert, serving=serving, client=client
    )
    progress(
        f"namespace {metrics_server.NAMESPACE}: {len(objects)} objects; it serves on port "
        f"{chosen.port} of its node"
    )
    for line in kubectl("apply", "-f", "-", stdin=_as_list(objects)).splitlines():
        progress(f"  {line}")
    deadline = time.monotonic() + chosen.timeout
    left = max(1, int(deadline - time.monotonic()))
    progress(f"waiting for deployment/{metrics_server.NAME} (its pod is a Slurm job)")
    kubectl(
        "rollout",
        "status",
        "-n",
        metrics_server.NAMESPACE,
        f"deployment/{metrics_server.NAME}",
        f"--timeout={left}s",
        timeout=left + 30,
    )
    for pod, job in _pod_jobs(
        kubectl, metrics_server.NAMESPACE, selector=f"k8s-app={metrics_server.NAME}"
    ):
        progress(f"  pod {pod}: Slurm job {job}")
    progress(f"waiting for the API server to serve {metrics_server.API_SERVICE}")
    while True:
        found = json.loads(kubectl("get", "apiservice", metrics_server.API_SERVICE, "-o", "json"))
        if metrics_server.available(found):
            break
        if time.monotonic() > deadline:
            raise AddonError(
                f"the API server does not serve {metrics_server.API_SERVICE} after "
                f"{chosen.timeout:.0f} s; see: kubectl describe apiservice "
                f"{metrics_server.API_SERVICE}"
            )
        sleep(2)
    progress(
        f"ready: kubectl top node, kubectl top pod (figures after two scrapes, "
        f"{2 * chosen.resolution_s} s)"
    )
    return 0


def uninstall_metrics_server(*, kubectl: Kubectl, progress: Progress) -> int:
    """Delete what `install_metrics_server` applied (the image stays in the cache, the
    certificates in ~/.hpk/pki)."""
    objects = metrics_server.removal()
    progress(f"deleting {len(objects)} objects of metrics-server")
    kubectl("delete", "--ignore-not-found", "-f", "-", stdin=_as_list(objects))
    return 0


def _pod_jobs(
    kubectl: Kubectl, namespace: str, *, app: str | None = None, selector: str | None = None
) -> list[tuple[str, str]]:
    chosen = selector or f"app={app}"
    out = kubectl("get", "pods", "-n", namespace, "-l", chosen, "-o", "json")
    found = []
    for pod in json.loads(out).get("items", []):
        annotations = pod["metadata"].get("annotations") or {}
        found.append((pod["metadata"]["name"], annotations.get("slurm.hpk.io/job-id", "?")))
    return found


def default_kubeconfig() -> Path:
    """$KUBECONFIG when set (its first file), else the cluster's ~/.hpk/kubeconfig."""
    named = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    return Path(named) if named else HpkHome.default().kubeconfig


def _say(message: str) -> None:
    print(f"[hpk addons] {message}", flush=True)


def _run(args: argparse.Namespace) -> int:
    settings = ArgoSettings(
        namespace=args.namespace,
        namespaced=args.namespaced,
        workflow_namespaces=tuple(args.workflow_namespace),
        artifacts=not args.no_artifacts,
        timeout=args.timeout,
    )
    try:
        kubectl = KubectlCommand(kubeconfig=default_kubeconfig())
        if args.addon == "metrics-server":
            if args.action == "install":
                return install_metrics_server(kubectl=kubectl, progress=_say)
            return uninstall_metrics_server(kubectl=kubectl, progress=_say)
        if args.action == "install":
            return install_argo(settings, kubectl=kubectl, progress=_say)
        return uninstall_argo(settings, kubectl=kubectl, progress=_say)
    except (AddonError, ToolchainMissing, ImageError) as error:
        print(f"hpk: {error}", file=sys.stderr)
        return 1


def add_addons_commands(commands: Any) -> None:
    """Register `hpk addons install|uninstall argo|metrics-server` on the CLI's subcommands."""
    addons = commands.add_parser(
        "addons",
        help="install add-ons into the running cluster (argo: Argo Workflows; "
        "metrics-server: kubectl top)",
        description="install argo: import Argo's images into the image cache, apply its "
        "install manifest for the pinned release, add the executor's Role, run MinIO as the "
        "default artifact repository (its data in ~/.hpk/artifacts), and wait until its "
        "controller runs. install metrics-server: import its image, issue its certificates "
        "from the cluster CA, apply its objects, and wait until the API server serves "
        "metrics.k8s.io. Both are safe to repeat; uninstall deletes those objects again.",
    )
    addons.add_argument("action", choices=["install", "uninstall"])
    addons.add_argument("addon", choices=["argo", "metrics-server"])
    addons.add_argument("--namespace", default="argo", help="where Argo runs (default: argo)")
    addons.add_argument(
        "--namespaced",
        action="store_true",
        help="upstream's namespace install: the controller sees only its own namespace",
    )
    addons.add_argument(
        "--workflow-namespace",
        action="append",
        default=[],
        metavar="NS",
        help="also let workflows run in NS (its default service account gets the executor's "
        "Role, and NS the artifact repository); may be repeated",
    )
    addons.add_argument(
        "--no-artifacts",
        action="store_true",
        help="no MinIO and no default artifact repository (argo only): for a site's own S3",
    )
    addons.add_argument(
        "--timeout", type=float, default=300, help="seconds to wait for Argo (argo only)"
    )
    addons.set_defaults(func=_run)
