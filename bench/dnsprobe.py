"""DNS lookups over UDP, timed one by one: the probe bench.network runs inside a pod.

    python -I bench/dnsprobe.py SERVER PORT NAME COUNT [--expect ADDRESS]

It sends COUNT queries for the A record of NAME to SERVER:PORT, one after the other, each
built by hand (RFC 1035), and prints one JSON object: `ms`, each lookup's round trip in
milliseconds, and `answers`, the addresses of the last reply. Exit 1 when a reply is an error,
or lacks ADDRESS.

Stdlib only and no import from the project: it runs in a pod's namespaces, as the pod's user.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence

TYPE_A = 1
CLASS_IN = 1
FLAG_RECURSION_DESIRED = 0x0100
FLAG_RESPONSE = 0x8000
TIMEOUT_S = 2.0


def query(name: str, ident: int, qtype: int = TYPE_A) -> bytes:
    """One DNS query packet for `name`: a header with one question, recursion desired."""
    labels = [label.encode("ascii") for label in name.rstrip(".").split(".")]
    if any(not 0 < len(label) < 64 for label in labels):
        raise ValueError(f"{name!r} is no DNS name")
    header = struct.pack("!HHHHHH", ident & 0xFFFF, FLAG_RECURSION_DESIRED, 1, 0, 0, 0)
    question = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    return header + question + struct.pack("!HH", qtype, CLASS_IN)


def _skip_name(packet: bytes, offset: int) -> int:
    """The offset just past the (possibly compressed) name at `offset`."""
    while True:
        if offset >= len(packet):
            raise ValueError("the reply ends inside a name")
        length = packet[offset]
        if length & 0xC0 == 0xC0:  # a pointer ends the name
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


def answers(reply: bytes, ident: int) -> list[str]:
    """The IPv4 addresses in the answer section of `reply` to query `ident`; ValueError when
    it is not that reply, is cut short or reports an error (its RCODE)."""
    if len(reply) < 12:
        raise ValueError("the reply is shorter than a header")
    got, flags, questions, count, _, _ = struct.unpack("!HHHHHH", reply[:12])
    if got != ident & 0xFFFF or not flags & FLAG_RESPONSE:
        raise ValueError(f"not the reply to query {ident}")
    if flags & 0x000F:
        raise ValueError(f"the server answered RCODE {flags & 0x000F}")
    offset = 12
    for _ in range(questions):
        offset = _skip_name(reply, offset) + 4
    found = []
    for _ in range(count):
        offset = _skip_name(reply, offset)
        if offset + 10 > len(reply):
            raise ValueError("the reply ends inside a record")
        rtype, rclass, _ttl, length = struct.unpack("!HHIH", reply[offset : offset + 10])
        offset += 10
        data = reply[offset : offset + length]
        if len(data) != length:
            raise ValueError("the reply ends inside a record's data")
        if rtype == TYPE_A and rclass == CLASS_IN and length == 4:
            found.append(socket.inet_ntoa(data))
        offset += length
    return found


def probe(
    server: str, port: int, name: str, count: int, *, expect: str | None = None
) -> tuple[list[float], list[str]]:
    """`count` lookups of `name`, one after the other: each one's milliseconds, and the
    addresses of the last reply; ValueError when a reply lacks `expect`."""
    times: list[float] = []
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as connection:
        connection.settimeout(TIMEOUT_S)
        connection.connect((server, port))
        for index in range(count):
            packet = query(name, index)
            began = time.perf_counter_ns()
            connection.send(packet)
            reply = connection.recv(4096)
            times.append((time.perf_counter_ns() - began) / 1e6)
            found = answers(reply, index)
            if expect is not None and expect not in found:
                raise ValueError(f"{name} gave {found}, not {expect}")
    return times, found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnsprobe")
    parser.add_argument("server")
    parser.add_argument("port", type=int)
    parser.add_argument("name")
    parser.add_argument("count", type=int)
    parser.add_argument("--expect", help="an address every reply must hold")
    args = parser.parse_args(argv)
    try:
        times, found = probe(args.server, args.port, args.name, args.count, expect=args.expect)
    except (OSError, ValueError) as error:
        print(f"dnsprobe: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"ms": [round(value, 4) for value in times], "answers": found}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
