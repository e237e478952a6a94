"""The cluster's certificates and keys, created once and reused on every later start.

An hpk cluster lives for many Slurm jobs: each job starts the control plane again, maybe on
another node. So every function here is load-or-create. A file that exists and still fits is
kept (same serial, same key), which keeps the user's kubeconfig and every service-account token
valid. A leaf certificate is issued again when it is close to expiry, was signed by another
CA, names another subject, or lacks a SAN that is now wanted (the job landed on a node with
another hostname or address). The CAs and the service-account key are never replaced on their
own: replacing them would invalidate everything issued before.

etcd uses TLS with client-certificate authentication, with its own CA. The API server's port
is open to the whole network and the node may be shared with other users, so plain HTTP on a
loopback port would let any local user read every Secret. A separate etcd CA keeps the
certificates that the controller-manager signs for CSRs (with the cluster CA) from ever
opening etcd.

Keys are ECDSA P-256, except the service-account signing key, which is RSA so that tokens use
RS256, the algorithm every Kubernetes client library accepts. Everything is written through
hpk.files: keys and kubeconfigs 0600, certificates 0644, folders 0700.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hpk.files import PRIVATE_FILE_MODE, PUBLIC_FILE_MODE, private_dir, write_atomic

log = logging.getLogger(__name__)

#: Clock skew allowed for: certificates are valid from a few minutes before they are made.
_BACKDATE = dt.timedelta(minutes=5)

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NODE_NAME = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")


class PKIError(RuntimeError):
    """A certificate or key on disk cannot be used and cannot be replaced automatically."""


class InvalidNodeName(ValueError):
    """A node name is not a DNS-1123 subdomain, so it cannot name a kubelet certificate."""


@dataclass(frozen=True)
class IssuePolicy:
    """How long new certificates live and when existing ones are issued again."""

    ca_validity: dt.timedelta = dt.timedelta(days=3650)
    """Lifetime of a new CA certificate."""

    cert_validity: dt.timedelta = dt.timedelta(days=365)
    """Lifetime of a new leaf (server or client) certificate."""

    renew_before: dt.timedelta = dt.timedelta(days=30)
    """A leaf certificate with less time than this left is issued again."""


DEFAULT_POLICY = IssuePolicy()


@dataclass(frozen=True)
class CertFiles:
    """Where one certificate and its private key live."""

    cert: Path
    """PEM certificate."""

    key: Path
    """PEM private key (PKCS#8)."""


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded CA: what signs leaf certificates."""

    certificate: x509.Certificate
    """The CA certificate."""

    key: CertificateIssuerPrivateKeyTypes
    """The CA's private key."""

    files: CertFiles
    """Where the CA lives on disk."""


# ---------------------------------------------------------------------------------------------
# Reading


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_private_key(path: Path) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def subject_alt_names(cert: x509.Certificate) -> set[str]:
    """The certificate's DNS and IP SANs, as strings (IP addresses in their compact form)."""
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    names: set[str] = set(extension.value.get_values_for_type(x509.DNSName))
    names.update(str(ip) for ip in extension.value.get_values_for_type(x509.IPAddress))
    return names


def _normalise_san(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower()


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name.lower())


def _subject(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    return x509.Name(attributes)


def _public_bytes(key: PrivateKeyTypes) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _cert_public_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------------------------------------
# Writing


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _save(files: CertFiles, cert: x509.Certificate, key: PrivateKeyTypes) -> None:
    # The key goes first: if we die in between, the next run sees a key that does not match
    # the certificate and issues both again.
    private_dir(files.key.parent)
    private_dir(files.cert.parent)
    write_atomic(files.key, _key_pem(key), mode=PRIVATE_FILE_MODE)
    write_atomic(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_FILE_MODE)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------------------------------
# CAs


def ensure_ca(
    files: CertFiles, *, common_name: str, policy: IssuePolicy = DEFAULT_POLICY
) -> CertificateAuthority:
    """Load the CA in `files`, or create a self-signed one there if it has no certificate.

    A key without a certificate is what a run killed while creating the CA leaves behind;
    nothing can have been signed with it, so it is replaced.
    """
    if files.cert.exists():
        return _load_ca(files, policy=policy)
    key = _new_key()
    now = _now()
    subject = _subject(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + policy.ca_validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _save(files, cert, key)
    log.info("created CA %r in %s", common_name, files.cert)
    return CertificateAuthority(certificate=cert, key=key, files=files)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; every certificate signs (the TLS handshake)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _load_ca(files: CertFiles, *, policy: IssuePolicy) -> CertificateAuthority:
    try:
        cert = load_certificate(files.cert)
        key = load_private_key(files.key)
    except (OSError, ValueError) as exc:
        raise PKIError(
            f"the CA in {files.cert} / {files.key} cannot be read ({exc}); a CA is never "
            "replaced automatically, because that would invalidate every certificate and "
            "kubeconfig issued from it"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PKIError(f"{files.key}: unsupported CA key type {type(key).__name__}")
    if _public_bytes(key) != _cert_public_bytes(cert):
        raise PKIError(f"{files.key} is not the key of the CA certificate {files.cert}")
    left = cert.not_valid_after_utc - _now()
    if left <= dt.timedelta(0):
        raise PKIError(f"the CA {files.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if left < policy.renew_before:
        log.warning(
            "the CA %s expires on %s; every certificate must then be issued again",
            files.cert,
            f"{cert.not_valid_after_utc:%Y-%m-%d}",
        )
    return CertificateAuthority(certificate=cert, key=key, files=files)


# ---------------------------------------------------------------------------------------------
# Leaf certificates


def _reason_to_reissue(
    files: CertFiles,
    *,
    ca: CertificateAuthority,
    subject: x509.Name,
    sans: Iterable[str],
    policy: IssuePolicy,
) -> str | None:
    """Why the certificate in `files` cannot be kept, or None if it can."""
    if not files.cert.exists() or not files.key.exists():
        return "missing"
    try:
        cert = load_certificate(files.cert)
        key = load_private_key(files.key)
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})"
    lacking = {_normalise_san(n) for n in sans} - subject_alt_names(cert)
    checks = [
        (
            _public_bytes(key) != _cert_public_bytes(cert),
            "the key does not match the certificate",
        ),
        (not _issued_by(cert, ca), "not signed by the current CA"),
        (
            cert.subject != subject,
            f"subject is {cert.subject.rfc4514_string()}, wanted {subject.rfc4514_string()}",
        ),
        (bool(lacking), f"lacks SANs {sorted(lacking)}"),
        (
            cert.not_valid_after_utc - _now() < policy.renew_before,
            f"expires on {cert.not_valid_after_utc:%Y-%m-%d}",
        ),
    ]
    return next((reason for failed, reason in checks if failed), None)


def _issued_by(cert: x509.Certificate, ca: CertificateAuthority) -> bool:
    try:
        cert.verify_directly_issued_by(ca.certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ensure_leaf(
    files: CertFiles,
    *,
    ca: CertificateAuthority,
    subject: x509.Name,
    sans: Sequence[str],
    usages: Sequence[x509.ObjectIdentifier],
    policy: IssuePolicy,
) -> x509.Certificate:
    reason = _reason_to_reissue(files, ca=ca, subject=subject, sans=sans, policy=policy)
    if reason is None:
        return load_certificate(files.cert)
    key = _new_key()
    now = _now()
    not_after = min(now + policy.cert_validity, ca.certificate.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        unique = list(dict.fromkeys(_normalise_san(n) for n in sans))
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in unique]), critical=False
        )
    cert = builder.sign(ca.key, hashes.SHA256())
    _save(files, cert, key)
    log.info("issued %s for %s (%s)", files.cert.name, subject.rfc4514_string(), reason)
    return cert


def ensure_server_cert(
    files: CertFiles,
    *,
    ca: CertificateAuthority,
    common_name: str,
    sans: Sequence[str],
    client_auth: bool = False,
    policy: IssuePolicy = DEFAULT_POLICY,
) -> x509.Certificate:
    """A serving certificate for `sans` (DNS names and IP addresses, mixed).

    With `client_auth` it may also authenticate as a client (an etcd peer does both).
    """
    if not sans:
        raise ValueError(f"a server certificate needs at least one SAN: {files.cert}")
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if client_auth:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    return _ensure_leaf(
        files, ca=ca, subject=_subject(common_name), sans=sans, usages=usages, policy=policy
    )


def ensure_client_cert(
    files: CertFiles,
    *,
    ca: CertificateAuthority,
    user: str,
    groups: Sequence[str] = (),
    policy: IssuePolicy = DEFAULT_POLICY,
) -> x509.Certificate:
    """A client certificate: Kubernetes reads the user from CN and the groups from O."""
    return _ensure_leaf(
        files,
        ca=ca,
        subject=_subject(user, groups),
        sans=(),
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        policy=policy,
    )


# ---------------------------------------------------------------------------------------------
# Service-account key


def ensure_service_account_key(private: Path, public: Path) -> None:
    """The RSA key pair that signs service-account tokens; created once, never rotated.

    The public half is written again whenever it is missing or does not match.
    """
    if private.exists():
        try:
            key = load_private_key(private)
        except (OSError, ValueError) as exc:
            raise PKIError(
                f"the service-account key {private} cannot be read ({exc}); it is never "
                "replaced automatically, because that would invalidate every token"
            ) from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise PKIError(f"{private}: the service-account key must be RSA")
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_dir(private.parent)
        write_atomic(private, _key_pem(key), mode=PRIVATE_FILE_MODE)
        log.info("created service-account key %s", private)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not public.exists() or public.read_bytes() != public_pem:
        private_dir(public.parent)
        write_atomic(public, public_pem, mode=PUBLIC_FILE_MODE)


# ---------------------------------------------------------------------------------------------
# Kubeconfig


def render_kubeconfig(
    *, server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, user: str, cluster: str
) -> str:
    """A kubeconfig with one cluster, one user and one context, all data embedded."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    context = f"{user}@{cluster}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(cert_pem),
                    "client-key-data": b64(key_pem),
                },
            }
        ],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
        "current-context": context,
        "preferences": {},
    }
    return yaml.safe_dump(config, sort_keys=False)


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_cert: Path,
    client: CertFiles,
    user: str | None = None,
    cluster: str = "hpk",
) -> None:
    """Write a kubeconfig (0600) for `server`, trusting `ca_cert` and logging in as `client`.

    The user's name in the file defaults to the client certificate's CN.
    """
    cert_pem = client.cert.read_bytes()
    if user is None:
        names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(
            NameOID.COMMON_NAME
        )
        user = str(names[0].value) if names else "user"
    text = render_kubeconfig(
        server=server,
        ca_pem=ca_cert.read_bytes(),
        cert_pem=cert_pem,
        key_pem=client.key.read_bytes(),
        user=user,
        cluster=cluster,
    )
    private_dir(path.parent)
    write_atomic(path, text, mode=PRIVATE_FILE_MODE)


# ---------------------------------------------------------------------------------------------
# The cluster's layout


def first_service_ip(service_cidr: str) -> str:
    """The ClusterIP of the `kubernetes` service: the first address of the service range."""
    return str(ipaddress.ip_network(service_cidr, strict=True)[1])


def apiserver_sans(
    *,
    hostname: str,
    node_ips: Sequence[str],
    service_cidr: str,
    cluster_domain: str,
    extra: Sequence[str] = (),
) -> list[str]:
    """Every name the API server is reached by: from the host, from pods and locally."""
    names = [
        hostname,
        *node_ips,
        "127.0.0.1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        f"kubernetes.default.svc.{cluster_domain}",
        first_service_ip(service_cidr),
        *extra,
    ]
    return list(dict.fromkeys(_normalise_san(n) for n in names if n))


class ClusterPKI:
    """Every certificate and key of one cluster, in one folder (0700).

    The properties only say where files are; `ensure_control_plane`,
    `ensure_hpk_kubelet_client`, `ensure_kubelet_serving` and `ensure_kubelet_client` create
    or refresh them.
    """

    ADMIN_USER = "kubernetes-admin"
    ADMIN_GROUPS = ("system:masters",)
    CONTROLLER_MANAGER_USER = "system:kube-controller-manager"
    APISERVER_KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"
    APISERVER_ETCD_CLIENT_USER = "kube-apiserver-etcd-client"
    FRONT_PROXY_CLIENT_USER = "front-proxy-client"
    """The API server's identity towards aggregated API servers (e.g. metrics-server)."""
    COREDNS_USER = "hpk:coredns"
    """CoreDNS's identity; the launcher binds it to a read-only ClusterRole."""
    KUBE_PROXY_USER = "system:kube-proxy"
    """kube-proxy's identity, which Kubernetes' bootstrap policy binds to system:node-proxier."""
    KUBELET_USER = "hpk:kubelet"
    """hpk-kubelet's identity. It registers a node per Slurm partition, which the Node
    authorizer's system:node:<name> identities cannot; RBAC grants it its rights instead."""
    KUBELET_GROUPS = ("hpk:kubelets",)
    METRICS_SERVER_USER = "hpk:metrics-server"
    """metrics-server's identity towards hpk-kubelet (`--kubelet-client-certificate`): the
    kubelet lets it read the pods' usage and its metrics, never a log."""
    METRICS_SERVER_NAME = "metrics-server.kube-system.svc"
    """The name the API server checks metrics-server's serving certificate against (the
    APIService's Service, `<name>.<namespace>.svc`)."""
    KUBELET_SERVING_NAME = "hpk-kubelet"
    """CN of the kubelet's serving certificate (clients check its SANs, not its CN)."""

    def __init__(self, root: Path, *, policy: IssuePolicy = DEFAULT_POLICY) -> None:
        self.root = root
        self.policy = policy

    def _pair(self, stem: str) -> CertFiles:
        return CertFiles(cert=self.root / f"{stem}.crt", key=self.root / f"{stem}.key")

    @property
    def ca(self) -> CertFiles:
        return self._pair("ca")

    @property
    def etcd_ca(self) -> CertFiles:
        return self._pair("etcd/ca")

    @property
    def front_proxy_ca(self) -> CertFiles:
        return self._pair("front-proxy-ca")

    @property
    def front_proxy_client(self) -> CertFiles:
        return self._pair("front-proxy-client")

    @property
    def etcd_server(self) -> CertFiles:
        return self._pair("etcd/server")

    @property
    def apiserver(self) -> CertFiles:
        return self._pair("apiserver")

    @property
    def apiserver_etcd_client(self) -> CertFiles:
        return self._pair("apiserver-etcd-client")

    @property
    def apiserver_kubelet_client(self) -> CertFiles:
        return self._pair("apiserver-kubelet-client")

    @property
    def admin(self) -> CertFiles:
        return self._pair("admin")

    @property
    def controller_manager(self) -> CertFiles:
        return self._pair("controller-manager")

    @property
    def controller_manager_server(self) -> CertFiles:
        return self._pair("controller-manager-server")

    @property
    def coredns(self) -> CertFiles:
        return self._pair("coredns")

    @property
    def kube_proxy(self) -> CertFiles:
        return self._pair("kube-proxy")

    @property
    def hpk_kubelet(self) -> CertFiles:
        return self._pair("hpk-kubelet")

    @property
    def kubelet_serving(self) -> CertFiles:
        return self._pair("kubelet-serving")

    @property
    def metrics_server_serving(self) -> CertFiles:
        return self._pair("metrics-server-serving")

    @property
    def metrics_server_client(self) -> CertFiles:
        return self._pair("metrics-server-kubelet-client")

    @property
    def sa_key(self) -> Path:
        return self.root / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "sa.pub"

    def kubelet_client(self, node_name: str) -> CertFiles:
        if len(node_name) > 253 or not _NODE_NAME.match(node_name):
            raise InvalidNodeName(f"not a valid node name (DNS-1123 subdomain): {node_name!r}")
        return self._pair(f"kubelet-client-{node_name}")

    def load_ca(self) -> CertificateAuthority:
        return ensure_ca(self.ca, common_name="hpk-ca", policy=self.policy)

    def ensure_control_plane(
        self,
        *,
        hostname: str,
        node_ips: Sequence[str],
        service_cidr: str,
        cluster_domain: str = "cluster.local",
        extra_sans: Sequence[str] = (),
    ) -> None:
        """Create or refresh everything etcd, the API server, the controller-manager and
        CoreDNS need. Cheap when nothing changed: it only reads the files.

        Three CAs: the cluster CA (API clients and servers), the etcd CA (only the API server
        may talk to etcd) and the front-proxy CA (only the API server may pass requests on to
        aggregated API servers in the name of a user).
        """
        private_dir(self.root)
        ca = self.load_ca()
        etcd_ca = ensure_ca(self.etcd_ca, common_name="hpk-etcd-ca", policy=self.policy)
        policy = self.policy
        loopback = ["localhost", "127.0.0.1"]

        ensure_server_cert(
            self.etcd_server,
            ca=etcd_ca,
            common_name="hpk-etcd",
            sans=loopback,
            client_auth=True,
            policy=policy,
        )
        ensure_client_cert(
            self.apiserver_etcd_client,
            ca=etcd_ca,
            user=self.APISERVER_ETCD_CLIENT_USER,
            policy=policy,
        )
        ensure_server_cert(
            self.apiserver,
            ca=ca,
            common_name="kube-apiserver",
            sans=apiserver_sans(
                hostname=hostname,
                node_ips=node_ips,
                service_cidr=service_cidr,
                cluster_domain=cluster_domain,
                extra=extra_sans,
            ),
            policy=policy,
        )
        ensure_client_cert(
            self.apiserver_kubelet_client,
            ca=ca,
            user=self.APISERVER_KUBELET_CLIENT_USER,
            groups=("system:masters",),
            policy=policy,
        )
        ensure_client_cert(
            self.admin, ca=ca, user=self.ADMIN_USER, groups=self.ADMIN_GROUPS, policy=policy
        )
        ensure_client_cert(
            self.controller_manager, ca=ca, user=self.CONTROLLER_MANAGER_USER, policy=policy
        )
        ensure_server_cert(
            self.controller_manager_server,
            ca=ca,
            common_name="kube-controller-manager",
            sans=loopback,
            policy=policy,
        )
        ensure_client_cert(self.coredns, ca=ca, user=self.COREDNS_USER, policy=policy)
        ensure_client_cert(self.kube_proxy, ca=ca, user=self.KUBE_PROXY_USER, policy=policy)
        front_proxy_ca = ensure_ca(
            self.front_proxy_ca, common_name="hpk-front-proxy-ca", policy=self.policy
        )
        ensure_client_cert(
            self.front_proxy_client,
            ca=front_proxy_ca,
            user=self.FRONT_PROXY_CLIENT_USER,
            policy=policy,
        )
        ensure_service_account_key(self.sa_key, self.sa_pub)

    def ensure_hpk_kubelet_client(self) -> CertFiles:
        """hpk-kubelet's client certificate (CN=hpk:kubelet, O=hpk:kubelets)."""
        ensure_client_cert(
            self.hpk_kubelet,
            ca=self.load_ca(),
            user=self.KUBELET_USER,
            groups=self.KUBELET_GROUPS,
            policy=self.policy,
        )
        return self.hpk_kubelet

    def ensure_kubelet_serving(self, *, hostname: str, addresses: Sequence[str]) -> CertFiles:
        """hpk-kubelet's serving certificate for its HTTPS API (`kubectl logs`), from the
        cluster CA, for the host name and the addresses its nodes advertise. The API server
        checks it against the cluster CA (`--kubelet-certificate-authority`). Issued again
        when the kubelet moves to a host with other names."""
        ensure_server_cert(
            self.kubelet_serving,
            ca=self.load_ca(),
            common_name=self.KUBELET_SERVING_NAME,
            sans=[hostname, *addresses],
            policy=self.policy,
        )
        return self.kubelet_serving

    def ensure_metrics_server_serving(self, *, cluster_domain: str = "cluster.local") -> CertFiles:
        """metrics-server's serving certificate, from the cluster CA, for the names of its
        Service; the API server checks it against the APIService's caBundle (the cluster
        CA) under the name `METRICS_SERVER_NAME`."""
        ensure_server_cert(
            self.metrics_server_serving,
            ca=self.load_ca(),
            common_name=self.METRICS_SERVER_NAME,
            sans=[
                self.METRICS_SERVER_NAME,
                self.METRICS_SERVER_NAME.removesuffix(".svc"),
                f"{self.METRICS_SERVER_NAME}.{cluster_domain}",
            ],
            policy=self.policy,
        )
        return self.metrics_server_serving

    def ensure_metrics_server_client(self) -> CertFiles:
        """metrics-server's client certificate towards hpk-kubelet (CN hpk:metrics-server, no
        group): the kubelet lets it read the pods' usage, and the API server grants the name
        nothing."""
        ensure_client_cert(
            self.metrics_server_client,
            ca=self.load_ca(),
            user=self.METRICS_SERVER_USER,
            policy=self.policy,
        )
        return self.metrics_server_client

    def ensure_kubelet_client(self, node_name: str) -> CertFiles:
        """The kubelet's client certificate for node `node_name` (CN=system:node:<name>,
        O=system:nodes, as the Node authorizer expects)."""
        files = self.kubelet_client(node_name)
        ensure_client_cert(
            files,
            ca=self.load_ca(),
            user=f"system:node:{node_name}",
            groups=("system:nodes",),
            policy=self.policy,
        )
        return files
