"""The command line, files and readiness check of each control-plane component.

Pure functions of the settings, the PKI, the ports and the state layout: they build a
`ProcessSpec` (argv, log, pid file) and say how to tell that the component is ready. Nothing
here starts a process; the launcher does. The same argv runs on the host or, later, inside
the control-plane image.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpk.controlplane.ports import Ports
from hpk.controlplane.probes import TLSClient, answers
from hpk.controlplane.settings import Binaries, ControlPlaneSettings, StateLayout
from hpk.pki import ClusterPKI
from hpk.process import ProcessSpec
from hpk.templating import render

ETCD = "etcd"
APISERVER = "kube-apiserver"
CONTROLLER_MANAGER = "kube-controller-manager"
COREDNS = "coredns"

#: Start order; stopping goes the other way.
ORDER = (ETCD, APISERVER, CONTROLLER_MANAGER, COREDNS)

ETCD_MEMBER = "hpk"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Context:
    """Everything the component builders read."""

    settings: ControlPlaneSettings
    """The control plane's settings."""

    binaries: Binaries
    """Where the programs are."""

    pki: ClusterPKI
    """The cluster's certificates."""

    ports: Ports
    """The ports chosen for this run."""

    layout: StateLayout
    """The state folder."""

    advertise_address: str
    """The API server's advertised address (resolved, never None)."""

    dns_bind_address: str
    """Where CoreDNS listens (resolved, never None)."""

    @property
    def apiserver_local_url(self) -> str:
        """How components on this node reach the API server."""
        bind = ipaddress.ip_address(self.settings.apiserver_bind_address)
        host = LOOPBACK if bind.is_unspecified or bind.is_loopback else str(bind)
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{self.ports.apiserver}"

    @property
    def etcd_url(self) -> str:
        return f"https://{LOOPBACK}:{self.ports.etcd_client}"

    @property
    def etcd_peer_url(self) -> str:
        return f"https://{LOOPBACK}:{self.ports.etcd_peer}"

    def spec(self, name: str, argv: list[str], *, paths: tuple[Path, ...] = ()) -> ProcessSpec:
        return ProcessSpec(
            name=name,
            argv=tuple(argv),
            log_file=self.layout.log_file(name),
            pid_file=self.layout.pid_file(name),
            paths=(self.layout.root, self.pki.root, *paths),
        )


@dataclass(frozen=True)
class Component:
    """One component: how to run it and how to know it is ready."""

    spec: ProcessSpec
    """What to run."""

    ready: Callable[[], bool]
    """True once the component serves requests; must return quickly."""

    ready_timeout_s: float
    """How long `ready` may stay false before start-up fails."""

    what: str
    """What `ready` checks, for error messages."""


def etcd(ctx: Context) -> Component:
    pki = ctx.pki
    argv = [
        str(ctx.binaries.etcd),
        f"--name={ETCD_MEMBER}",
        f"--data-dir={ctx.layout.etcd_data}",
        f"--listen-client-urls={ctx.etcd_url}",
        f"--advertise-client-urls={ctx.etcd_url}",
        f"--listen-peer-urls={ctx.etcd_peer_url}",
        f"--initial-advertise-peer-urls={ctx.etcd_peer_url}",
        f"--initial-cluster={ETCD_MEMBER}={ctx.etcd_peer_url}",
        "--initial-cluster-state=new",
        "--initial-cluster-token=hpk",
        f"--cert-file={pki.etcd_server.cert}",
        f"--key-file={pki.etcd_server.key}",
        f"--trusted-ca-file={pki.etcd_ca.cert}",
        "--client-cert-auth=true",
        f"--peer-cert-file={pki.etcd_server.cert}",
        f"--peer-key-file={pki.etcd_server.key}",
        f"--peer-trusted-ca-file={pki.etcd_ca.cert}",
        "--peer-client-cert-auth=true",
        "--snapshot-count=10000",
        "--log-level=warn",
    ]
    tls = TLSClient(ca=pki.etcd_ca.cert, client=pki.apiserver_etcd_client)
    url = f"{ctx.etcd_url}/health"
    return Component(
        spec=ctx.spec(ETCD, argv),
        ready=lambda: answers(url, tls=tls, expect='"health":"true"'),
        ready_timeout_s=ctx.settings.etcd_ready_timeout_s,
        what=f"healthy at {url}",
    )


def service_account_issuer(settings: ControlPlaneSettings) -> str:
    return f"https://kubernetes.default.svc.{settings.cluster_domain}"


def kube_apiserver(ctx: Context) -> Component:
    pki = ctx.pki
    settings = ctx.settings
    argv = [
        str(ctx.binaries.kube_apiserver),
        f"--advertise-address={ctx.advertise_address}",
        f"--bind-address={settings.apiserver_bind_address}",
        f"--secure-port={ctx.ports.apiserver}",
        f"--tls-cert-file={pki.apiserver.cert}",
        f"--tls-private-key-file={pki.apiserver.key}",
        f"--client-ca-file={pki.ca.cert}",
        "--anonymous-auth=false",
        "--authorization-mode=Node,RBAC",
        # On top of the default set, which needs no component hpk lacks.
        "--enable-admission-plugins=NodeRestriction",
        f"--etcd-servers={ctx.etcd_url}",
        f"--etcd-cafile={pki.etcd_ca.cert}",
        f"--etcd-certfile={pki.apiserver_etcd_client.cert}",
        f"--etcd-keyfile={pki.apiserver_etcd_client.key}",
        f"--service-cluster-ip-range={settings.service_cidr}",
        f"--service-account-issuer={service_account_issuer(settings)}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--kubelet-client-certificate={pki.apiserver_kubelet_client.cert}",
        f"--kubelet-client-key={pki.apiserver_kubelet_client.key}",
        # hpk-kubelet serves with a certificate of the cluster CA for the addresses its nodes
        # advertise; the InternalIP is the host's, which the certificate names.
        f"--kubelet-certificate-authority={pki.ca.cert}",
        "--kubelet-preferred-address-types=InternalIP,Hostname,InternalDNS,ExternalDNS,ExternalIP",
        # Aggregated APIs (metrics-server and the like): the API server proves itself with the
        # front-proxy client certificate. Without kube-proxy, ClusterIPs do not route, so it
        # calls the endpoints directly.
        f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}",
        f"--requestheader-allowed-names={ClusterPKI.FRONT_PROXY_CLIENT_USER}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
        f"--proxy-client-key-file={pki.front_proxy_client.key}",
        "--enable-aggregator-routing=true",
        "--profiling=false",
    ]
    tls = TLSClient(ca=pki.ca.cert, client=pki.admin)
    url = f"{ctx.apiserver_local_url}/readyz"
    return Component(
        spec=ctx.spec(APISERVER, argv),
        ready=lambda: answers(url, tls=tls, expect="ok"),
        ready_timeout_s=settings.apiserver_ready_timeout_s,
        what=f"ready at {url}",
    )


def kube_controller_manager(ctx: Context) -> Component:
    pki = ctx.pki
    kubeconfig = ctx.layout.controller_manager_kubeconfig
    argv = [
        str(ctx.binaries.kube_controller_manager),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--bind-address={LOOPBACK}",
        f"--secure-port={ctx.ports.controller_manager}",
        f"--tls-cert-file={pki.controller_manager_server.cert}",
        f"--tls-private-key-file={pki.controller_manager_server.key}",
        f"--client-ca-file={pki.ca.cert}",
        f"--service-account-private-key-file={pki.sa_key}",
        f"--root-ca-file={pki.ca.cert}",
        "--use-service-account-credentials=true",
        f"--cluster-signing-cert-file={pki.ca.cert}",
        f"--cluster-signing-key-file={pki.ca.key}",
        f"--service-cluster-ip-range={ctx.settings.service_cidr}",
        "--controllers=*",
        # Its default is under /usr/libexec, which it would try to create.
        f"--flex-volume-plugin-dir={ctx.layout.flexvolume_dir}",
        "--leader-elect=false",
        "--profiling=false",
    ]
    tls = TLSClient(ca=pki.ca.cert)
    url = f"https://{LOOPBACK}:{ctx.ports.controller_manager}/healthz"
    return Component(
        spec=ctx.spec(CONTROLLER_MANAGER, argv),
        ready=lambda: answers(url, tls=tls, expect="ok"),
        ready_timeout_s=ctx.settings.controller_manager_ready_timeout_s,
        what=f"healthy at {url}",
    )


def corefile_token(value: str) -> str:
    """`value` as one Corefile token; refuses what the Corefile lexer cannot carry."""
    if any(ch in value for ch in '"\\\n\r{}'):
        raise ValueError(f"cannot put {value!r} into a Corefile")
    return f'"{value}"' if any(ch.isspace() for ch in value) else value


def render_corefile(ctx: Context, *, upstreams: list[str]) -> str:
    """The Corefile: the cluster domain from the API, everything else forwarded upstream."""
    return render(
        "coredns/Corefile.j2",
        port=ctx.ports.dns,
        bind_address=ctx.dns_bind_address,
        probe_address=LOOPBACK,
        health_port=ctx.ports.dns_health,
        ready_port=ctx.ports.dns_ready,
        cluster_domain=ctx.settings.cluster_domain,
        kubeconfig=corefile_token(str(ctx.layout.coredns_kubeconfig)),
        upstreams=upstreams,
    )


def coredns(ctx: Context) -> Component:
    argv = [str(ctx.binaries.coredns), "-conf", str(ctx.layout.corefile)]
    url = f"http://{LOOPBACK}:{ctx.ports.dns_ready}/ready"
    return Component(
        spec=ctx.spec(COREDNS, argv),
        ready=lambda: answers(url),
        ready_timeout_s=ctx.settings.coredns_ready_timeout_s,
        what=f"ready at {url}",
    )


BUILDERS: dict[str, Callable[[Context], Component]] = {
    ETCD: etcd,
    APISERVER: kube_apiserver,
    CONTROLLER_MANAGER: kube_controller_manager,
    COREDNS: coredns,
}
