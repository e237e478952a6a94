"""Small HTTP(S) requests against the components: readiness probes and bootstrap objects.

The API server refuses anonymous requests and etcd wants a client certificate, so the probes
speak mutual TLS with certificates from the cluster's PKI. The standard library is enough for
a handful of requests; this keeps the launcher free of an HTTP client dependency.
"""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from hpk.pki import CertFiles


@dataclass(frozen=True)
class TLSClient:
    """How to reach one HTTPS endpoint: whom to trust and which certificate to show."""

    ca: Path
    """CA that signed the server's certificate."""

    client: CertFiles | None = None
    """Client certificate, for servers that ask for one."""

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if self.client is not None:
            context.load_cert_chain(str(self.client.cert), str(self.client.key))
        return context


@dataclass(frozen=True)
class Response:
    """What came back."""

    status: int
    """HTTP status code."""

    body: str
    """Body, decoded as UTF-8 (lossy)."""


def request(
    url: str,
    *,
    tls: TLSClient | None = None,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Response:
    """One request; raises OSError (including ssl.SSLError) when no answer comes."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        if tls is None:
            raise ValueError(f"{url}: an https request needs TLS settings")
        connection = http.client.HTTPSConnection(
            host, parts.port, timeout=timeout, context=tls.context()
        )
    elif parts.scheme == "http":
        connection = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    else:
        raise ValueError(f"unsupported URL scheme: {url}")
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        return Response(status=answer.status, body=answer.read().decode("utf-8", "replace"))
    finally:
        connection.close()


def answers(url: str, *, tls: TLSClient | None = None, expect: str | None = None) -> bool:
    """Whether `url` answers 200 (and, if given, with `expect` somewhere in the body)."""
    try:
        response = request(url, tls=tls, timeout=3.0)
    except (OSError, http.client.HTTPException):
        return False
    return response.status == 200 and (expect is None or expect in response.body)
