"""The pod network benchmark's pure parts (bench/network.py, bench/dnsprobe.py): DNS packets,
the table, the arithmetic; nothing that needs a namespace."""

from __future__ import annotations

import socket
import struct

import pytest

from bench import dnsprobe
from bench.network import (
    Figure,
    busiest,
    core_percent,
    corefile,
    iperf_mbit,
    job_line,
    met,
    nth_address,
    table,
)


def _reply(ident: int, name: str, addresses: list[str], *, rcode: int = 0) -> bytes:
    """A server's reply to `dnsprobe.query(name, ident)`: the question again, then one A
    record per address, each naming the question through a compression pointer."""
    question = dnsprobe.query(name, ident)[12:]
    header = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, len(addresses), 0, 0)
    records = b"".join(
        struct.pack("!HHHIH", 0xC00C, 1, 1, 30, 4) + socket.inet_aton(address)
        for address in addresses
    )
    return header + question + records


def test_a_query_is_a_header_with_one_question_for_the_a_record() -> None:
    packet = dnsprobe.query("web.bench.svc.cluster.local.", 0x1_0203)
    assert packet[:12] == bytes.fromhex("0203 0100 0001 0000 0000 0000")
    assert packet[12:] == (b"\x03web\x05bench\x03svc\x07cluster\x05local\x00" + b"\x00\x01\x00\x01")
    with pytest.raises(ValueError, match="no DNS name"):
        dnsprobe.query("a..b", 1)
    with pytest.raises(ValueError, match="no DNS name"):
        dnsprobe.query("x" * 64 + ".local", 1)


def test_a_reply_gives_its_addresses_past_compressed_names() -> None:
    name = "web.bench.svc.cluster.local"
    reply = _reply(7, name, ["10.96.12.34", "10.96.12.35"])
    assert dnsprobe.answers(reply, 7) == ["10.96.12.34", "10.96.12.35"]
    assert dnsprobe.answers(_reply(8, name, []), 8) == []
    # A record of another type is passed over.
    other = _reply(9, name, ["10.96.0.1"]).replace(
        struct.pack("!HHHIH", 0xC00C, 1, 1, 30, 4), struct.pack("!HHHIH", 0xC00C, 16, 1, 30, 4)
    )
    assert dnsprobe.answers(other, 9) == []


def test_a_reply_that_is_not_ours_cut_short_or_an_error_is_refused() -> None:
    name = "web.bench.svc.cluster.local"
    reply = _reply(7, name, ["10.96.12.34"])
    with pytest.raises(ValueError, match="not the reply to query 8"):
        dnsprobe.answers(reply, 8)
    with pytest.raises(ValueError, match="not the reply"):
        dnsprobe.answers(dnsprobe.query(name, 7), 7)  # a query, not a response
    with pytest.raises(ValueError, match="RCODE 3"):
        dnsprobe.answers(_reply(7, name, [], rcode=3), 7)
    with pytest.raises(ValueError, match="shorter than a header"):
        dnsprobe.answers(reply[:11], 7)
    with pytest.raises(ValueError, match="data"):
        dnsprobe.answers(reply[:-1], 7)
    with pytest.raises(ValueError, match="inside a record"):
        dnsprobe.answers(reply[:-8], 7)
    with pytest.raises(ValueError, match="inside a name"):
        dnsprobe.answers(reply[:20], 7)


def test_core_percent_and_targets() -> None:
    assert core_percent(3.0, 60.0) == 5.0
    assert core_percent(0.0123, 1.0) == 1.23
    with pytest.raises(ValueError, match="longer than zero"):
        core_percent(1.0, 0.0)
    assert met(300.0, ("<=", 300.0)) is True
    assert met(300.1, ("<=", 300.0)) is False
    assert met(1000.0, (">=", 1000.0)) is True
    assert met(999.0, (">=", 1000.0)) is False
    assert met(None, ("<=", 1.0)) is None
    assert met(1.0, None) is None


def test_busiest_counts_from_the_first_snapshot_or_from_0() -> None:
    before = {1: ("hpk-tunnel", 10.0), 2: ("iperf3", 1.0), 3: ("sleep", 0.5)}
    after = {1: ("hpk-tunnel", 12.5), 2: ("iperf3", 1.5), 3: ("sleep", 0.5), 4: ("new", 1.0)}
    found = busiest(before, after, 5.0, labels={1: "hub tunnel"}, count=3)
    assert found == [
        {"process": "hub tunnel", "pid": 1, "cpu_percent": 50.0},
        {"process": "new", "pid": 4, "cpu_percent": 20.0},
        {"process": "iperf3", "pid": 2, "cpu_percent": 10.0},
    ]
    # A pid reused by another program counts from 0; an idle process is left out.
    assert busiest({5: ("old", 9.0)}, {5: ("reused", 1.0), 6: ("idle", 0.0)}, 1.0) == [
        {"process": "reused", "pid": 5, "cpu_percent": 100.0}
    ]


def test_the_table_lines_up_its_columns_and_says_which_targets_are_met() -> None:
    figures = [
        Figure("pod_start", "pod start", "ms", 212.5, 0.0),
        Figure("throughput", "pod to pod", "Mbit/s", 396.3, 12480.8),
        Figure("tunnel_after_iperf", "tunnel RSS", "MB", 28.5, None),
    ]
    assert table(figures).splitlines() == [
        "| figure     | pod network  | host network   | target        | met    |",
        "|------------|--------------|----------------|---------------|--------|",
        "| pod start  | 212.5 ms     | 0 ms           | ≤ 300 ms      | met    |",
        "| pod to pod | 396.3 Mbit/s | 12480.8 Mbit/s | ≥ 1000 Mbit/s | missed |",
        "| tunnel RSS | 28.5 MB      | -              |               |        |",
    ]
    found = figures[0].as_json()
    assert found["target"] == {"op": "<=", "value": 300.0}
    assert found["met"] is True
    assert (found["pod_network"], found["host_network"], found["unit"]) == (212.5, 0.0, "ms")


def test_iperf_reports_lines_and_addresses() -> None:
    report = {"end": {"sum_received": {"bits_per_second": 812_345_678.9}}}
    assert iperf_mbit(report) == 812.3
    with pytest.raises(ValueError, match="unable to connect"):
        iperf_mbit({"error": "unable to connect to server"})
    assert job_line("pod 123 456\n") == (123, 456)
    with pytest.raises(RuntimeError, match="did not start: host cannot open /dev/net/tun"):
        job_line("host cannot open /dev/net/tun\n")
    with pytest.raises(RuntimeError, match="no line"):
        job_line("")
    assert nth_address("10.244.1.2", 0) == "10.244.1.2"
    assert nth_address("10.244.1.2", 300) == "10.244.2.46"


def test_the_corefile_answers_the_service_name_on_the_given_address() -> None:
    text = corefile(port=53, bind="10.96.0.10")
    assert text.startswith(".:53 {\n    bind 10.96.0.10\n")
    assert "10.96.12.34 web.bench.svc.cluster.local" in text
    assert text.count("{") == text.count("}")
