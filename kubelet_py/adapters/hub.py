"""The pod network's hub, as the kubelet drives it: the pods' keys, and the hub's peers.

The hub (docs/networking.md) runs in the control-plane job: one hpk-tunnel whose control
socket speaks WireGuard's cross-platform interface (`set=1`, `get=1`). The kubelet gives each
pod a fresh key pair, and tells the hub that the pod's public key may send from, and be sent,
the pod's address alone. A packet under any other key is dropped by the hub, which is what
keeps another user's pods, on the same nodes, out of this cluster's network.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kubelet_py.errors import BackendError

TIMEOUT_S = 5.0


def new_private_key() -> str:
    """A WireGuard private key (Curve25519), hex."""
    return X25519PrivateKey.generate().private_bytes_raw().hex()


def public_key(private_key: str) -> str:
    """The public key of a hex private key, hex."""
    key = X25519PrivateKey.from_private_bytes(bytes.fromhex(private_key))
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


class HubUnavailable(BackendError):
    """The hub's control socket did not answer, or refused a change."""


@dataclass(frozen=True)
class Hub:
    """The hub's control socket."""

    control: Path

    def add(self, public_key: str, address: str) -> None:
        """Let `public_key` send from and be sent `address` (one /32 or /128) alone."""
        bits = 128 if ":" in address else 32
        self._set(
            f"public_key={public_key}\nreplace_allowed_ips=true\nallowed_ip={address}/{bits}\n"
        )

    def remove(self, public_key: str) -> None:
        self._set(f"public_key={public_key}\nremove=true\n")

    def peers(self) -> dict[str, list[str]]:
        """Public key -> its allowed addresses, as the hub holds them."""
        return {
            peer: [value for key, value in fields if key == "allowed_ip"]
            for peer, fields in self._peer_fields().items()
        }

    def handshakes(self) -> dict[str, int]:
        """Public key -> when the hub last completed a handshake with it, in seconds since
        the epoch (0: never yet)."""
        return {
            peer: next((int(v) for k, v in fields if k == "last_handshake_time_sec"), 0)
            for peer, fields in self._peer_fields().items()
        }

    def _peer_fields(self) -> dict[str, list[tuple[str, str]]]:
        """Public key -> the (key, value) lines the hub's `get=1` gives for that peer."""
        peers: dict[str, list[tuple[str, str]]] = {}
        current: list[tuple[str, str]] | None = None
        for line in self._ask("get=1\n\n").splitlines():
            key, _, value = line.partition("=")
            if key == "public_key":
                current = peers.setdefault(value, [])
            elif current is not None:
                current.append((key, value))
        return peers

    def _set(self, body: str) -> None:
        answer = self._ask(f"set=1\n{body}\n")
        if "errno=0" not in answer.splitlines():
            raise HubUnavailable(f"the hub refused a change: {answer.strip()!r}")

    def _ask(self, request: str) -> str:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.settimeout(TIMEOUT_S)
                connection.connect(str(self.control))
                connection.sendall(request.encode())
                answer = b""
                while not answer.endswith(b"\n\n"):
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        except OSError as error:
            raise HubUnavailable(f"the hub at {self.control}: {error}") from None
        return answer.decode(errors="replace")
