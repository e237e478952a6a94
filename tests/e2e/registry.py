"""A read-only image registry on the loopback, for pulling an image end to end here, where no
real registry is reachable.

It serves the images of `docker save` tarballs over the registry HTTP API (the parts a pull
uses: `/v2/`, manifests by tag or digest, blobs), each as an OCI image manifest with the
archive's config and uncompressed layers. Plain HTTP, no authentication: what Apptainer's
`pull --no-https docker://127.0.0.1:PORT/...` needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class Registry:
    """What the server holds: manifests by repository and tag or digest, blobs by digest."""

    manifests: dict[tuple[str, str], bytes] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    """Every request line served, for the test to check the pull came here."""

    def add_archive(self, archive: Path, repository: str, tag: str) -> str:
        """Serve the (first) image of `archive` as `repository:tag`; returns its digest."""
        with tarfile.open(archive) as tar:

            def member(name: str) -> bytes:
                extracted = tar.extractfile(name)
                assert extracted is not None, name
                return extracted.read()

            [entry] = json.loads(member("manifest.json"))[:1]
            config = member(entry["Config"])
            layers = [member(name) for name in entry["Layers"]]
        descriptors = []
        for media_type, blob in [(CONFIG_TYPE, config), *((LAYER_TYPE, layer) for layer in layers)]:
            digest = f"sha256:{hashlib.sha256(blob).hexdigest()}"
            self.blobs[digest] = blob
            descriptors.append({"mediaType": media_type, "digest": digest, "size": len(blob)})
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": descriptors[0],
                "layers": descriptors[1:],
            }
        ).encode()
        digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
        self.manifests[repository, tag] = manifest
        self.manifests[repository, digest] = manifest
        return digest


def _handler(registry: Registry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, *, body: bool) -> None:
            registry.requests.append(f"{self.command} {self.path}")
            path = self.path.split("?", 1)[0]
            found: tuple[bytes, Mapping[str, str]] | None = None
            if path in ("/v2", "/v2/"):
                found = (b"{}", {"Content-Type": "application/json"})
            elif path.startswith("/v2/") and "/manifests/" in path:
                repository, reference = path[4:].split("/manifests/", 1)
                manifest = registry.manifests.get((repository, reference))
                if manifest is not None:
                    digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
                    found = (
                        manifest,
                        {"Content-Type": MANIFEST_TYPE, "Docker-Content-Digest": digest},
                    )
            elif path.startswith("/v2/") and "/blobs/" in path:
                blob = registry.blobs.get(path.rsplit("/blobs/", 1)[1])
                if blob is not None:
                    found = (blob, {"Content-Type": "application/octet-stream"})
            if found is None:
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                if body:
                    self.wfile.write(b"{}")
                return
            payload, headers = found
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the requests are kept in `registry.requests`

    return Handler


@contextlib.contextmanager
def serving(registry: Registry) -> Iterator[str]:
    """Serve `registry` on a free loopback port inside the block; yields `127.0.0.1:PORT`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(registry))
    thread = threading.Thread(target=server.serve_forever, name="registry", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
