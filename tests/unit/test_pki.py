"""The cluster PKI: what a TLS peer would accept, who a client certificate says it is, file
modes, and when certificates are kept or issued again."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from hpk.pki import (
    CertFiles,
    ClusterPKI,
    InvalidNodeName,
    IssuePolicy,
    PKIError,
    load_certificate,
    load_private_key,
    subject_alt_names,
    write_kubeconfig,
)

pytestmark = pytest.mark.timeout(60)

HOSTNAME = "cp-node-7"
NODE_IPS = ("192.0.2.17", "2001:db8::17")
SERVICE_CIDR = "10.96.0.0/16"


def ensure(pki: ClusterPKI, *, node_ips: tuple[str, ...] = NODE_IPS) -> None:
    pki.ensure_control_plane(hostname=HOSTNAME, node_ips=node_ips, service_cidr=SERVICE_CIDR)


@pytest.fixture
def pki(tmp_path: Path) -> ClusterPKI:
    cluster = ClusterPKI(tmp_path / "home" / ".hpk" / "pki")
    ensure(cluster)
    return cluster


def all_leaves(pki: ClusterPKI) -> dict[str, CertFiles]:
    return {
        "apiserver": pki.apiserver,
        "apiserver-kubelet-client": pki.apiserver_kubelet_client,
        "admin": pki.admin,
        "controller-manager": pki.controller_manager,
        "controller-manager-server": pki.controller_manager_server,
        "coredns": pki.coredns,
        "etcd-server": pki.etcd_server,
        "apiserver-etcd-client": pki.apiserver_etcd_client,
        "front-proxy-client": pki.front_proxy_client,
    }


def serials(pki: ClusterPKI) -> dict[str, int]:
    files = {"ca": pki.ca, "etcd-ca": pki.etcd_ca, **all_leaves(pki)}
    return {name: load_certificate(f.cert).serial_number for name, f in files.items()}


def identity(files: CertFiles) -> tuple[str, list[str]]:
    subject = load_certificate(files.cert).subject
    cn = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    orgs = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert len(cn) == 1
    return cn[0], orgs


def store(ca: CertFiles) -> Store:
    return Store([load_certificate(ca.cert)])


# --- what a TLS peer would accept ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        HOSTNAME,
        "192.0.2.17",
        "2001:db8::17",
        "127.0.0.1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "10.96.0.1",
    ],
)
def test_apiserver_certificate_is_valid_for_every_name_clients_use(
    pki: ClusterPKI, name: str
) -> None:
    assert name in subject_alt_names(load_certificate(pki.apiserver.cert))
    subject: x509.DNSName | x509.IPAddress
    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = PolicyBuilder().store(store(pki.ca)).build_server_verifier(subject)
    chain = verifier.verify(load_certificate(pki.apiserver.cert), [])
    assert chain[-1] == load_certificate(pki.ca.cert)


def test_apiserver_certificate_is_not_valid_for_other_names(pki: ClusterPKI) -> None:
    verifier = (
        PolicyBuilder().store(store(pki.ca)).build_server_verifier(x509.DNSName("evil.example"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(load_certificate(pki.apiserver.cert), [])


@pytest.mark.parametrize(
    ("leaf", "ca"),
    [
        ("apiserver", "ca"),
        ("controller-manager-server", "ca"),
        ("etcd-server", "etcd-ca"),
    ],
)
def test_server_certificates_chain_to_their_ca(pki: ClusterPKI, leaf: str, ca: str) -> None:
    cas = {"ca": pki.ca, "etcd-ca": pki.etcd_ca}
    cert = load_certificate(all_leaves(pki)[leaf].cert)
    verifier = (
        PolicyBuilder().store(store(cas[ca])).build_server_verifier(x509.DNSName("localhost"))
    )
    assert verifier.verify(cert, [])[-1] == load_certificate(cas[ca].cert)
    other = {"ca": pki.etcd_ca, "etcd-ca": pki.ca}[ca]
    wrong = PolicyBuilder().store(store(other)).build_server_verifier(x509.DNSName("localhost"))
    with pytest.raises(VerificationError):
        wrong.verify(cert, [])


@pytest.mark.parametrize(
    ("leaf", "ca"),
    [
        ("admin", "ca"),
        ("controller-manager", "ca"),
        ("coredns", "ca"),
        ("apiserver-kubelet-client", "ca"),
        ("apiserver-etcd-client", "etcd-ca"),
        ("front-proxy-client", "front-proxy-ca"),
    ],
)
def test_client_certificates_are_signed_by_their_ca_only(
    pki: ClusterPKI, leaf: str, ca: str
) -> None:
    cas = {"ca": pki.ca, "etcd-ca": pki.etcd_ca, "front-proxy-ca": pki.front_proxy_ca}
    cert = load_certificate(all_leaves(pki)[leaf].cert)
    for name, files in cas.items():
        issuer = load_certificate(files.cert)
        if name == ca:
            cert.verify_directly_issued_by(issuer)
        else:
            with pytest.raises(ValueError):
                cert.verify_directly_issued_by(issuer)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


# --- who a client certificate says it is ------------------------------------------------------


def test_client_identities(pki: ClusterPKI) -> None:
    assert identity(pki.admin) == ("kubernetes-admin", ["system:masters"])
    assert identity(pki.controller_manager) == ("system:kube-controller-manager", [])
    assert identity(pki.apiserver_kubelet_client) == (
        "kube-apiserver-kubelet-client",
        ["system:masters"],
    )
    assert identity(pki.coredns) == ("hpk:coredns", [])


def test_kubelet_client_certificate_names_the_node(pki: ClusterPKI) -> None:
    files = pki.ensure_kubelet_client("batch")
    assert identity(files) == ("system:node:batch", ["system:nodes"])
    load_certificate(files.cert).verify_directly_issued_by(load_certificate(pki.ca.cert))
    other = pki.ensure_kubelet_client("gpu.partition")
    assert identity(other) == ("system:node:gpu.partition", ["system:nodes"])
    assert other.cert != files.cert


@pytest.mark.parametrize("name", ["", "Batch", "../etc", "a b", "-x", "x" * 254])
def test_kubelet_client_refuses_invalid_node_names(pki: ClusterPKI, name: str) -> None:
    with pytest.raises(InvalidNodeName):
        pki.ensure_kubelet_client(name)


def test_service_account_key_is_rsa_and_public_half_matches(pki: ClusterPKI) -> None:
    key = load_private_key(pki.sa_key)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size >= 2048
    public = pki.sa_pub.read_bytes()
    assert public.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert public == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- file modes --------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_0600_and_folders_0700(pki: ClusterPKI, tmp_path: Path) -> None:
    keys = [f.key for f in all_leaves(pki).values()]
    keys += [pki.ca.key, pki.etcd_ca.key, pki.front_proxy_ca.key, pki.sa_key]
    for key in keys:
        assert mode(key) == 0o600, key
    for folder in (tmp_path / "home", tmp_path / "home" / ".hpk", pki.root, pki.root / "etcd"):
        assert mode(folder) == 0o700, folder
    leftovers = [p.name for p in pki.root.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        cluster = ClusterPKI(tmp_path / "pki")
        ensure(cluster)
        kubeconfig = tmp_path / "kube" / "config"
        write_kubeconfig(
            kubeconfig,
            server="https://127.0.0.1:6443",
            ca_cert=cluster.ca.cert,
            client=cluster.admin,
        )
    finally:
        os.umask(old)
    assert mode(cluster.root) == 0o700
    assert mode(cluster.admin.key) == 0o600
    assert mode(cluster.sa_key) == 0o600
    assert mode(cluster.admin.cert) == 0o644
    assert mode(kubeconfig) == 0o600
    assert mode(kubeconfig.parent) == 0o700


def test_existing_folder_is_tightened_to_0700(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    ensure(ClusterPKI(root))
    assert mode(root) == 0o700


# --- kubeconfig --------------------------------------------------------------------------------


def test_kubeconfig_embeds_server_ca_and_client(pki: ClusterPKI, tmp_path: Path) -> None:
    path = tmp_path / "admin.conf"
    write_kubeconfig(path, server="https://192.0.2.17:6443", ca_cert=pki.ca.cert, client=pki.admin)
    config = yaml.safe_load(path.read_text())
    assert config["kind"] == "Config"
    (cluster,) = config["clusters"]
    (user,) = config["users"]
    (context,) = config["contexts"]
    assert cluster["cluster"]["server"] == "https://192.0.2.17:6443"
    data = cluster["cluster"]["certificate-authority-data"]
    assert base64.b64decode(data) == pki.ca.cert.read_bytes()
    assert user["name"] == "kubernetes-admin"
    assert base64.b64decode(user["user"]["client-certificate-data"]) == pki.admin.cert.read_bytes()
    assert base64.b64decode(user["user"]["client-key-data"]) == pki.admin.key.read_bytes()
    assert config["current-context"] == context["name"]
    assert context["context"] == {"cluster": cluster["name"], "user": user["name"]}


# --- load or create ----------------------------------------------------------------------------


def test_second_call_reuses_every_certificate_and_key(pki: ClusterPKI) -> None:
    before = serials(pki)
    keys_before = {name: f.key.read_bytes() for name, f in all_leaves(pki).items()}
    sa_before = pki.sa_key.read_bytes()
    ensure(ClusterPKI(pki.root))
    assert serials(pki) == before
    assert {name: f.key.read_bytes() for name, f in all_leaves(pki).items()} == keys_before
    assert pki.sa_key.read_bytes() == sa_before


def test_new_node_address_reissues_only_the_apiserver_certificate(pki: ClusterPKI) -> None:
    before = serials(pki)
    ensure(pki, node_ips=(*NODE_IPS, "198.51.100.4"))
    after = serials(pki)
    assert after["apiserver"] != before["apiserver"]
    assert "198.51.100.4" in subject_alt_names(load_certificate(pki.apiserver.cert))
    assert {k: v for k, v in after.items() if k != "apiserver"} == {
        k: v for k, v in before.items() if k != "apiserver"
    }


def test_dropping_an_address_keeps_the_certificate(pki: ClusterPKI) -> None:
    before = serials(pki)
    ensure(pki, node_ips=NODE_IPS[:1])
    assert serials(pki) == before


def test_certificates_near_expiry_are_issued_again(tmp_path: Path) -> None:
    short = ClusterPKI(tmp_path / "pki", policy=IssuePolicy(cert_validity=dt.timedelta(days=10)))
    ensure(short)
    before = serials(short)
    left = load_certificate(short.admin.cert).not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert left < dt.timedelta(days=11)

    ensure(ClusterPKI(short.root))
    after = serials(short)
    for name in all_leaves(short):
        assert after[name] != before[name], name
    assert after["ca"] == before["ca"]
    assert after["etcd-ca"] == before["etcd-ca"]
    left = load_certificate(short.admin.cert).not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert left > dt.timedelta(days=300)


def test_certificate_of_another_ca_is_issued_again(pki: ClusterPKI, tmp_path: Path) -> None:
    foreign = ClusterPKI(tmp_path / "other")
    ensure(foreign)
    pki.admin.cert.write_bytes(foreign.admin.cert.read_bytes())
    pki.admin.key.write_bytes(foreign.admin.key.read_bytes())
    ensure(pki)
    load_certificate(pki.admin.cert).verify_directly_issued_by(load_certificate(pki.ca.cert))


def test_mismatched_key_is_replaced(pki: ClusterPKI) -> None:
    pki.admin.key.write_bytes(pki.coredns.key.read_bytes())
    ensure(pki)
    cert = load_certificate(pki.admin.cert)
    key = load_private_key(pki.admin.key)
    assert cert.public_key() == key.public_key()


def test_damaged_ca_is_never_replaced(pki: ClusterPKI) -> None:
    pki.ca.key.write_text("not a key\n")
    with pytest.raises(PKIError, match="never replaced"):
        ensure(ClusterPKI(pki.root))


def test_ca_key_without_certificate_is_replaced(tmp_path: Path) -> None:
    cluster = ClusterPKI(tmp_path / "pki")
    cluster.root.mkdir()
    cluster.ca.key.write_text("left over by a killed run\n")
    ensure(cluster)
    ca = load_certificate(cluster.ca.cert)
    assert ca.public_key() == load_private_key(cluster.ca.key).public_key()
