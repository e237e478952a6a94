"""Entry point of `hpk-kubelet`. Logging is configured here and nowhere else.

The kubelet connects to the API server with its own identity (CN `hpk:kubelet`, which the
control plane grants exactly the rights a kubelet needs), logs `CONNECTED_MESSAGE` (the
control-plane job waits for that line), and then works on threads of its own, because the
Kubernetes client blocks:

- `nodes`: registers one Node per Slurm partition and rewrites its status and capacity;
- `leases`: renews each node's Lease in kube-node-lease, the heartbeat;
- `binder-watch` and `binder-*`: bind every unscheduled pod to its partition's node;
- `pods-watch` and `pods-*`: the pod controller's workers, which run every pod bound to the
  nodes as a Slurm job (kubelet_py.loops.controller and kubelet_py.provider), with the job
  watcher's thread;
- `events`: sends the binder's and the controller's Events (kubelet_py.loops.events);
- `tokens`: issues the service-account tokens of running pods' projected volumes again
  before they expire (kubelet_py.loops.tokens);
- `storage`, `claims-watch` and `volumes-watch`: the provisioner of the `hpk-local`
  StorageClass (kubelet_py.loops.provisioner), one folder per PersistentVolumeClaim;
- `logserver`: the HTTPS kubelet API (`kubectl logs`, kubelet_py.loops.logserver), when it has its
  certificate (`--tls-cert-file`); its port is bound before anything else, so a port that is
  taken ends the kubelet at once. It also serves the pods' usage (`/stats/summary`,
  `/metrics/resource`: kubelet_py.loops.stats) and the kubelet's own metrics (`/metrics`:
  kubelet_py.loops.metrics, counted from the Slurm adapter, the controller and the binder).

SIGTERM or SIGINT stops them all within a few seconds and leaves the nodes registered (see
kubelet_py.loops.nodes for why) and the pods' jobs running (a restart adopts them).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any
from urllib.parse import quote, urlsplit

from hpk import __version__
from hpk.controlplane.host import hostname, primary_address
from hpk.home import HpkHome
from hpk.toolchain import find_apptainer
from kubelet_py import CONNECTED_MESSAGE
from kubelet_py.adapters.apiserver import ApiError, ApiUnavailable, KubeApi, ListWatch, pod_path
from kubelet_py.adapters.front import Front, FrontFailed, FrontSettings
from kubelet_py.adapters.slurm import SlurmClient, SubprocessRunner
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.loops.binder import Binder, BinderSettings, unbound_pods
from kubelet_py.loops.controller import BOUND_PODS, PodController
from kubelet_py.loops.events import EventRecorder, PodWarnings
from kubelet_py.loops.logserver import (
    SERVE_FAILED,
    LogServer,
    LookupUnavailable,
    Planner,
    PodLookup,
    ServerTLS,
)
from kubelet_py.loops.markerwatch import WATCH_FAILED, MarkerWatch
from kubelet_py.loops.metrics import KubeletMetrics
from kubelet_py.loops.nodes import (
    HostInfo,
    NodeAgent,
    NodeSettings,
    SlurmNodeAddresses,
    partitions_from,
)
from kubelet_py.loops.provisioner import (
    CLAIMS_PATH,
    VOLUMES_PATH,
    KubeStorageApi,
    Provisioner,
    ProvisionerSettings,
)
from kubelet_py.loops.pulls import PullSettings
from kubelet_py.loops.stats import PodStats, stats_routes
from kubelet_py.loops.tokens import TokenManager, TokenSettings
from kubelet_py.loops.watcher import JobView, JobWatcher
from kubelet_py.pod.network import PodNetworkSettings
from kubelet_py.pod.resources import parse_quantity
from kubelet_py.pod.storage import with_claims
from kubelet_py.pod.streams import PlanRefused, PlanSettings, StreamRequest, plan
from kubelet_py.provider import ProviderSettings, SlurmProvider

log = logging.getLogger("kubelet_py")


@dataclass(frozen=True)
class KubeletSettings:
    """Everything the kubelet process is started with."""

    kubeconfig: Path
    """Credentials of the kubelet's identity and the API server's address."""

    nodes: NodeSettings = field(default_factory=NodeSettings)
    """Which partition nodes to register and how to keep them alive."""

    binder: BinderSettings = field(default_factory=BinderSettings)
    """How unscheduled pods are watched and bound."""

    node_ip: str | None = None
    """InternalIP of the nodes; None: this machine's primary address."""

    hostname: str | None = None
    """Hostname address of the nodes; None: this machine's host name."""

    connect_timeout_s: float = 60.0
    """How long to wait for the API server at start."""

    stop_timeout_s: float = 3.0
    """How long the threads get to finish after SIGTERM."""

    home: HpkHome | None = None
    """The hpk folder whose `pods/` holds the pod folders and `images/` the images;
    None: the user's (HPK_HOME or ~/.hpk)."""

    tls: ServerTLS | None = None
    """The kubelet API's certificate and client CA; None: the API is not served."""

    address: str = "0.0.0.0"  # noqa: S104 (the API server connects to the node's address)
    """Where the kubelet API listens; its port is `nodes.kubelet_port`."""

    pod_api_server: str | None = None
    """The API server's URL as pods on the compute nodes reach it (KUBERNETES_SERVICE_HOST
    and _PORT); None: the kubeconfig's, with a loopback host replaced by the node IP."""

    tokens: TokenSettings = field(default_factory=TokenSettings)
    """When the pods' service-account tokens are issued again."""
    volumes_dir: Path | None = None
    """Where the provisioner of the `hpk-local` StorageClass keeps the claims' folders (on
    the filesystem the compute nodes share); None: `<hpk home>/volumes`."""
    insecure_registries: tuple[str, ...] = ()
    """Registries pulled from over plain HTTP, besides those on the loopback."""
    pulls: PullSettings = field(default_factory=PullSettings)
    """How long an image pull may run, how much it may write, how many run at once (and the
    registries pulled from over plain HTTP, as `insecure_registries`)."""
    allow_mail_flags: bool = False
    """Whether pods' flags annotations may pass --mail-type and --mail-user: mail leaves the
    cluster, and a chart's pods could flood the user's mailbox, so it is off unless asked."""
    pod_network: Path | None = None
    """The pod network hub's file (hpk.controlplane.network); None: every pod uses the node's
    network."""
    front: Path | None = None
    """`hpk-kubelet-api`, which then holds the kubelet API's port and serves exec, attach and
    port-forward (kubelet_py.adapters.front); None: the API serves logs alone, with TLS."""


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _byte_count(text: str) -> int:
    """A size flag: bytes, or a quantity such as 16Gi or 500M."""
    try:
        count = parse_quantity(text, field="size")
    except InvalidPodSpec as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 16Gi") from error
    return math.ceil(count)


def parse_args(argv: Sequence[str] | None = None) -> KubeletSettings:
    defaults = NodeSettings()
    pulls = PullSettings()
    parser = argparse.ArgumentParser(prog="hpk-kubelet")
    parser.add_argument("--version", action="version", version=f"hpk-kubelet {__version__}")
    parser.add_argument("--kubeconfig", type=Path, required=True, help="the kubelet's kubeconfig")
    parser.add_argument(
        "--node-name-prefix",
        default=defaults.prefix,
        help="nodes are named <prefix>-<partition> (default: %(default)s)",
    )
    parser.add_argument(
        "--partitions",
        type=_csv,
        default=None,
        help="comma-separated Slurm partitions to register (default: all)",
    )
    parser.add_argument(
        "--default-partition",
        default=None,
        help="partition of pods that ask for none (default: Slurm's default)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=defaults.kubelet_port,
        help="HTTPS port of the kubelet API the nodes advertise (default: %(default)s)",
    )
    parser.add_argument(
        "--address",
        default="0.0.0.0",  # noqa: S104 (the API server connects to the node's address)
        help="address the kubelet API listens on (default: %(default)s)",
    )
    parser.add_argument(
        "--tls-cert-file",
        type=Path,
        default=None,
        help="serving certificate of the kubelet API; without it the API is not served",
    )
    parser.add_argument("--tls-private-key-file", type=Path, default=None, help="its key")
    parser.add_argument(
        "--client-ca-file",
        type=Path,
        default=None,
        help="CA of the client certificates the kubelet API accepts (the cluster CA)",
    )
    parser.add_argument(
        "--volumes-dir",
        type=Path,
        default=None,
        help="folder of the hpk-local StorageClass's volumes, on the filesystem the compute "
        "nodes share (default: <hpk home>/volumes)",
    )
    parser.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="a registry to pull images from over plain HTTP (repeatable); registries on the "
        "loopback always are",
    )
    parser.add_argument(
        "--image-pull-timeout",
        type=float,
        default=pulls.timeout_s,
        metavar="SECONDS",
        help="an image pull running longer is stopped, and its pods get ErrImagePull "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--image-pull-max-size",
        type=_byte_count,
        default=pulls.max_bytes,
        metavar="SIZE",
        help="an image pull writing more (the SIF and Apptainer's temporary files; bytes or "
        "a quantity such as 16Gi) is stopped, and its pods get ErrImagePull (default: 16Gi)",
    )
    parser.add_argument(
        "--max-parallel-image-pulls",
        type=int,
        default=pulls.max_concurrent,
        help="image pulls that run at once; the others wait (default: %(default)s)",
    )
    parser.add_argument("--node-ip", default=None, help="InternalIP of the nodes")
    parser.add_argument("--hostname", default=None, help="Hostname address of the nodes")
    parser.add_argument(
        "--node-status-interval",
        type=float,
        default=defaults.status_interval_s,
        help="seconds between capacity refreshes (default: %(default)s)",
    )
    parser.add_argument(
        "--lease-interval",
        type=float,
        default=defaults.lease_interval_s,
        help="seconds between Lease renewals (default: %(default)s)",
    )
    parser.add_argument(
        "--lease-duration",
        type=int,
        default=defaults.lease_duration_s,
        help="the Leases' leaseDurationSeconds (default: %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to wait for the API server"
    )
    parser.add_argument(
        "--pod-api-server",
        default=None,
        help="the API server's https URL as pods reach it (default: the kubeconfig's, with a "
        "loopback host replaced by --node-ip)",
    )
    parser.add_argument(
        "--token-refresh-fraction",
        type=float,
        default=TokenSettings().refresh_fraction,
        help="share of a service-account token's lifetime after which it is issued again "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--pod-network",
        type=Path,
        default=None,
        help="the pod network hub's file, written by the control-plane job (default: pods use "
        "the node's network)",
    )
    parser.add_argument(
        "--kubelet-api-front",
        type=Path,
        default=None,
        help="hpk-kubelet-api, to hold the kubelet API's port and serve exec, attach and "
        "port-forward (default: the API serves logs alone)",
    )
    parser.add_argument(
        "--allow-mail-flags",
        action="store_true",
        help="let pods ask Slurm for mail (--mail-type, --mail-user in slurm.hpk.io/flags)",
    )
    args = parser.parse_args(argv)
    try:
        tokens = TokenSettings(refresh_fraction=args.token_refresh_fraction)
        pulls = PullSettings(
            insecure_registries=tuple(args.insecure_registry),
            timeout_s=args.image_pull_timeout,
            max_bytes=args.image_pull_max_size,
            max_concurrent=args.max_parallel_image_pulls,
        )
        if args.pod_api_server is not None:
            service_endpoint(args.pod_api_server)
    except ValueError as error:
        parser.error(str(error))
    try:
        nodes = NodeSettings(
            prefix=args.node_name_prefix,
            partitions=args.partitions or None,
            default_partition=args.default_partition,
            kubelet_port=args.port,
            status_interval_s=args.node_status_interval,
            lease_interval_s=args.lease_interval,
            lease_duration_s=args.lease_duration,
        )
    except ValueError as error:
        parser.error(str(error))
    tls_files = (args.tls_cert_file, args.tls_private_key_file, args.client_ca_file)
    if any(tls_files) and not all(tls_files):
        parser.error("--tls-cert-file, --tls-private-key-file and --client-ca-file go together")
    tls = None
    if args.tls_cert_file:
        tls = ServerTLS(
            cert=args.tls_cert_file, key=args.tls_private_key_file, client_ca=args.client_ca_file
        )
    return KubeletSettings(
        tls=tls,
        address=args.address,
        kubeconfig=args.kubeconfig,
        nodes=nodes,
        node_ip=args.node_ip,
        hostname=args.hostname,
        connect_timeout_s=args.connect_timeout,
        pod_api_server=args.pod_api_server,
        tokens=tokens,
        volumes_dir=args.volumes_dir,
        insecure_registries=tuple(args.insecure_registry),
        pulls=pulls,
        allow_mail_flags=args.allow_mail_flags,
        pod_network=args.pod_network,
        front=args.kubelet_api_front,
    )


@dataclass(frozen=True)
class HubFile:
    """What the control-plane job wrote of the pod network's hub."""

    network: PodNetworkSettings
    control: Path
    """The hub tunnel's control socket (kubelet_py.adapters.hub)."""
    relay: Path | None
    """The relay that dials pods for port-forwards; None when the hub has none."""


def _pod_network(hub_file: Path | None) -> HubFile | None:
    """The pod network, from the hub's file; None without one, or when it cannot be read
    (pods then use the node's network)."""
    if hub_file is None:
        log.info("no --pod-network: pods use the node's network")
        return None
    try:
        hub = json.loads(hub_file.read_text())
        found = HubFile(
            network=PodNetworkSettings.from_json(hub),
            control=Path(hub["control"]),
            relay=Path(hub["relay"]) if hub.get("relay") else None,
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.error("pods use the node's network: the hub's file %s: %s", hub_file, error)
        return None
    network = found.network
    log.info("pod network %s through the hub at %s", network.pod_cidr, network.hub_endpoint)
    return found


def service_endpoint(url: str, *, node_ip: str | None = None) -> tuple[str, int]:
    """(host, port) of the API server's `url` for pods: a loopback host, which means nothing
    on a compute node, becomes `node_ip` (the address the API server advertises)."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"the API server's URL must be https://HOST[:PORT], not {url!r}")
    host = parts.hostname
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback and node_ip:
        host = node_ip
    return host, parts.port or 443


def _connect(api: KubeApi, *, stopping: threading.Event, timeout_s: float) -> str | None:
    """The API server's version once it answers; None if it did not in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return api.server_version()
        except (ApiError, ApiUnavailable) as error:
            if time.monotonic() > deadline or stopping.is_set():
                log.error("cannot reach the API server: %s", error)
                return None
        stopping.wait(1.0)


def pod_lookup(api: KubeApi) -> PodLookup:
    """The log server's view of a pod: the API server's, asked on each request."""

    def lookup(namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return api.get_or_none(pod_path(namespace, name))
        except (ApiError, ApiUnavailable) as error:
            raise LookupUnavailable(str(error)) from error

    return lookup


def _log_server(
    settings: KubeletSettings,
    tls: ServerTLS,
    *,
    pods_dir: Path,
    api: KubeApi,
    warnings: PodWarnings | None = None,
) -> LogServer | None:
    """The kubelet API, its port bound; None (and the reason logged) when it cannot be."""
    try:
        return LogServer(
            tls=tls,
            pods_dir=pods_dir,
            address=settings.address,
            port=settings.nodes.kubelet_port,
            lookup=pod_lookup(api),
            warnings=warnings,
        )
    except OSError as error:  # ssl.SSLError is one too
        log.error(
            "cannot serve the kubelet API on %s:%d: %s",
            settings.address,
            settings.nodes.kubelet_port,
            error,
        )
        return None


def _front_server(
    settings: KubeletSettings,
    tls: ServerTLS,
    front_binary: Path,
    *,
    pods_dir: Path,
    api: KubeApi,
    warnings: PodWarnings,
    planner: Planner,
) -> tuple[LogServer, Front] | None:
    """The kubelet API behind its front: the Python server on a Unix socket of this node that
    only this user can open, and the front on the port; None (the reason logged) when either
    cannot start."""
    backend = Path(tempfile.mkdtemp(prefix="hpk-kubelet-api-")) / "kubelet.sock"
    front = Front(
        FrontSettings(
            binary=front_binary,
            address=settings.address,
            port=settings.nodes.kubelet_port,
            cert=tls.cert,
            key=tls.key,
            client_ca=tls.client_ca,
            backend=backend,
        )
    )
    try:
        server = LogServer(
            unix=backend,
            port=settings.nodes.kubelet_port,
            open_port=front.open_port,
            pods_dir=pods_dir,
            lookup=pod_lookup(api),
            warnings=warnings,
            planner=planner,
        )
    except OSError as error:
        log.error("cannot serve the kubelet API to its front on %s: %s", backend, error)
        return None
    try:
        front.start()
    except (FrontFailed, OSError) as error:
        log.error("cannot serve the kubelet API on port %d: %s", settings.nodes.kubelet_port, error)
        server.stop()
        return None
    server.start()
    return server, front


def _thread(name: str, target: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except Exception:  # the loops catch their own failures; this is the last resort
            log.exception("thread %s failed", name)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def run(  # noqa: PLR0912, PLR0915 (every thread's wiring, start and stop in one place)
    settings: KubeletSettings, *, stopping: threading.Event
) -> int:
    """Run the kubelet until `stopping` is set; returns the process's exit status."""
    home = settings.home or HpkHome.default()
    node_api = KubeApi(settings.kubeconfig)
    binder_api = KubeApi(settings.kubeconfig)
    pod_api = KubeApi(settings.kubeconfig)
    log_api = KubeApi(settings.kubeconfig)
    event_api = KubeApi(settings.kubeconfig)
    token_api = KubeApi(settings.kubeconfig)
    storage_api = KubeApi(settings.kubeconfig)
    server: LogServer | None = None
    front: Front | None = None
    events = EventRecorder(event_api)
    # The front may ask for plans before the provider exists: it is told the kubelet starts.
    make_plan: list[Planner] = []

    def planner(data: object) -> Mapping[str, Any]:
        if not make_plan:
            raise PlanRefused(HTTPStatus.SERVICE_UNAVAILABLE, "the kubelet is starting")
        return make_plan[0](data)

    metrics = KubeletMetrics()
    try:
        if settings.tls is not None and settings.front is not None:
            served = _front_server(
                settings,
                settings.tls,
                settings.front,
                pods_dir=home.root / "pods",
                api=log_api,
                warnings=PodWarnings(events, reason=SERVE_FAILED),
                planner=planner,
            )
            if served is None:
                return 1
            server, front = served
        elif settings.tls is not None:
            server = _log_server(
                settings,
                settings.tls,
                pods_dir=home.root / "pods",
                api=log_api,
                warnings=PodWarnings(events, reason=SERVE_FAILED),
            )
            if server is None:
                return 1
        else:
            log.warning("no --tls-cert-file: the kubelet API (kubectl logs) is not served")
        version = _connect(node_api, stopping=stopping, timeout_s=settings.connect_timeout_s)
        if version is None:
            return 0 if stopping.is_set() else 1
        log.info("%s (%s)", CONNECTED_MESSAGE, version)
        host = HostInfo.detect(
            address=settings.node_ip or primary_address(),
            hostname=settings.hostname or hostname(),
            kubelet_version=f"{version}-hpk",
        )
        agent = NodeAgent(
            node_api,
            source=partitions_from(SlurmClient(SubprocessRunner(), observer=metrics.observe_slurm)),
            settings=settings.nodes,
            host=host,
            ports=server,
        )
        watch = unbound_pods(binder_api, settings.binder)
        slurm = SlurmClient(SubprocessRunner(), observer=metrics.observe_slurm)
        changed: list[Callable[[str, JobView], None]] = []

        def on_change(key: str, view: JobView) -> None:
            for callback in changed:
                callback(key, view)

        watcher = JobWatcher(slurm, on_change)
        hub = _pod_network(settings.pod_network)
        tokens = TokenManager(token_api, settings=settings.tokens, events=events)
        provider = SlurmProvider(
            slurm=slurm,
            watcher=watcher,
            settings=ProviderSettings(
                pods_dir=home.root / "pods",
                apptainer=PurePosixPath(find_apptainer()),
                image_cache=home.root / "images",
                node_addresses=SlurmNodeAddresses(agent.current, host_address=host.address),
                kubernetes_service=(
                    service_endpoint(settings.pod_api_server)
                    if settings.pod_api_server
                    else service_endpoint(pod_api.server, node_ip=host.address)
                ),
                insecure_registries=settings.insecure_registries,
                allow_mail_flags=settings.allow_mail_flags,
                network=None if hub is None else hub.network,
                hub_control=None if hub is None else hub.control,
            ),
            lookup=with_claims(pod_api.get_config_object, pod_api.get_or_none),
            tokens=tokens,
            services=lambda namespace: pod_api.list(
                f"/api/v1/namespaces/{quote(namespace, safe='')}/services"
            )[0],
        )
        tokens.alive = provider.runs
        plan_settings = PlanSettings(
            python=provider.settings.python or PurePosixPath(sys.executable),
            relay=None if hub is None else hub.relay,
        )

        def plan_for(data: object) -> Mapping[str, Any]:
            request = StreamRequest.parse(data)
            running = provider.stream_target(request.namespace, request.pod)
            return plan(request, running, plan_settings).to_json()

        make_plan.append(plan_for)
        agent.network = provider.network_condition
        # The provider makes its puller; how long, how large and how many pulls run are the
        # kubelet's settings (no pull has started yet).
        provider.images.settings = settings.pulls

        def known_pod(key: str) -> dict[str, Any] | None:
            namespace, _, name = key.partition("/")
            return provider.get_pod(namespace, name)

        provisioner = Provisioner(
            api=KubeStorageApi(storage_api),
            settings=ProvisionerSettings(root=settings.volumes_dir or home.root / "volumes"),
        )
        claims_watch = ListWatch(storage_api, CLAIMS_PATH)
        volumes_watch = ListWatch(storage_api, VOLUMES_PATH)

        def partition_of(node_name: str) -> str | None:
            nodes = agent.current()
            if nodes is not None:
                found = nodes.by_node_name(node_name)
                return found.partition.name if found else None
            prefix = f"{settings.nodes.prefix}-"
            return node_name[len(prefix) :] or None if node_name.startswith(prefix) else None

        changed.append(provider.job_changed)
        controller = PodController(
            pod_api,
            provider,
            partition_of=partition_of,
            events=events,
            status_lag=metrics.observe_status_lag,
        )
        markers = MarkerWatch(
            provider.running_folders,
            provider.markers_changed,
            warnings=PodWarnings(events, reason=WATCH_FAILED, lookup=known_pod),
        )
        binder = Binder(
            binder_api,
            nodes=agent.current,
            settings=settings.binder,
            events=events,
            starter=controller,
        )
        pods_watch = ListWatch(pod_api, pod_path(), field_selector=BOUND_PODS)
        metrics.watch_queue("pods", controller.queued)
        metrics.watch_queue("binder", binder.queued)
        metrics.watch_phases(controller.phases)
        if server is not None:
            stats = PodStats(pods=provider.running_pods, usage=slurm.usage)
            server.add_routes({**stats_routes(stats), "/metrics": metrics.route()})
        stop = threading.Event()
        watcher.start()
        threads = [
            _thread("nodes", lambda: agent.run_status(stop)),
            _thread("leases", lambda: agent.run_leases(stop)),
            _thread("binder-watch", lambda: binder.follow(watch)),
            _thread("binder", lambda: binder.work(stop)),
            _thread("pods-watch", lambda: controller.follow(pods_watch)),
            _thread("pods", lambda: controller.work(stop)),
            _thread("events", lambda: events.run(stop)),
            _thread("tokens", lambda: tokens.run(stop)),
            _thread("storage", lambda: provisioner.run(storage_api, stop)),
            _thread("claims-watch", lambda: provisioner.follow(claims_watch, claims=True)),
            _thread("volumes-watch", lambda: provisioner.follow(volumes_watch, claims=False)),
            _thread("markers", lambda: markers.run(stop)),
        ]
        if server is not None and front is None:
            threads.append(server.start())
        stopping.wait()
        began = time.monotonic()
        stop.set()
        watch.stop()
        binder.stop()
        pods_watch.stop()
        claims_watch.stop()
        volumes_watch.stop()
        controller.stop()
        events.wake()
        tokens.wake()
        watcher.stop(timeout=settings.stop_timeout_s)
        if front is not None:
            front.stop()
            front = None
        if server is not None:
            server.stop()
            server = None
        deadline = began + settings.stop_timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = [thread.name for thread in threads if thread.is_alive()]
        if late:
            log.warning("threads still busy after %.0f s: %s", settings.stop_timeout_s, late)
        log.info("stopped in %.1f s; the nodes stay registered", time.monotonic() - began)
        return 0
    finally:
        if front is not None:
            front.stop()
        if server is not None:
            server.stop()
        node_api.close()
        binder_api.close()
        pod_api.close()
        log_api.close()
        event_api.close()
        token_api.close()
        storage_api.close()


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return run(settings, stopping=stopping)


if __name__ == "__main__":
    sys.exit(main())
