"""`python -m bench.run`: run the benchmark and write bench/results/<date>.json and .png.

    python -m bench.run                 # the full run (about 10 minutes)
    python -m bench.run --quick         # small numbers, for checking the harness
    python -m bench.run --only lag,start --pods 100

Needs root (it starts a private Slurm test bed, see bench.stack) and the toolchain
(`make toolchain`). The chart needs matplotlib (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.measures import Bench, Sizes
from bench.stack import Stack, StackSettings

MEASUREMENTS = ("throughput", "lag", "load", "start")
"""In the order they run; "load" also gives the footprint."""

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description="Run the hpk benchmark."
    )
    parser.add_argument("--quick", action="store_true", help="small numbers (about 3 minutes)")
    parser.add_argument(
        "--only",
        default=",".join(MEASUREMENTS),
        help=f"comma-separated measurements (default: {','.join(MEASUREMENTS)})",
    )
    parser.add_argument("--pods", type=int, default=None, help="pods of the throughput run")
    parser.add_argument("--lag-pods", type=int, default=None, help="pods of the lag run")
    parser.add_argument(
        "--load-pods",
        default=None,
        help="small,large live pods of the load run (default 100,1000; quick 20,100)",
    )
    parser.add_argument("--load-running", type=int, default=None, help="running load pods")
    parser.add_argument("--start-pods", type=int, default=None, help="pods of the start run")
    parser.add_argument("--window", type=float, default=None, help="load window in seconds")
    parser.add_argument("--root", type=Path, default=StackSettings.root, help="bench folder")
    parser.add_argument(
        "--keep-bed", action="store_true", help="leave the private Slurm bed up at the end"
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: dated)")
    parser.add_argument("--no-chart", action="store_true", help="write no PNG")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - set(MEASUREMENTS))
    if unknown:
        parser.error(f"unknown measurements {unknown}; valid: {', '.join(MEASUREMENTS)}")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.quick() if args.quick else Sizes()
    changes: dict[str, Any] = {}
    if args.pods is not None:
        changes["throughput"] = args.pods
    if args.lag_pods is not None:
        changes["lag"] = args.lag_pods
    if args.load_pods is not None:
        small, large = (int(part) for part in args.load_pods.split(","))
        changes.update(load_small=small, load_large=large)
    if args.load_running is not None:
        changes["load_running"] = args.load_running
    if args.start_pods is not None:
        changes["start"] = args.start_pods
    if args.window is not None:
        changes["window_s"] = args.window
    return dataclasses.replace(sizes, **changes)


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent,
    ).stdout.strip()
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--", "kubelet_py", "hpk", "templates"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent,
    ).stdout.split("\n")
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in load],
        "commit": commit or None,
        "uncommitted_changes": sorted(line[3:] for line in changed if line.strip()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root, as the Slurm test bed does", file=sys.stderr)
        return 2
    sizes = sizes_from(args)
    chosen = [name for name in MEASUREMENTS if name in args.only.split(",")]
    began = time.monotonic()

    def progress(message: str) -> None:
        print(f"[bench {time.monotonic() - began:6.1f}s] {message}", flush=True)

    now = datetime.now(UTC)
    out = args.out or RESULTS / f"{now:%Y-%m-%d}{'-quick' if args.quick else ''}.json"
    results: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.run", *(argv or sys.argv[1:])]),
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "sizes": dataclasses.asdict(sizes),
    }
    stack = Stack(StackSettings(root=args.root, keep_bed=args.keep_bed))
    try:
        stack.start(progress)
        results["stack"] = {
            "slurm_nodes": stack.settings.nodes,
            "cpus_per_node": stack.settings.cpus_per_node,
            "min_job_age_s": stack.settings.min_job_age_s,
        }
        bench = Bench(stack, sizes, progress)
        for name in chosen:
            if name == "load":
                results["load"], results["footprint"] = bench.load()
            else:
                results[name] = getattr(bench, name)()
            _write(out, results)
    finally:
        stack.stop(progress)
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    _write(out, results)
    progress(f"results in {out}")
    if not args.no_chart:
        from bench.chart import draw  # noqa: PLC0415 - matplotlib only when drawing

        png = draw(out)
        progress(f"chart in {png}")
    print(json.dumps(headline(results), indent=2))
    return 0


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the README quotes, and whether each target is met."""
    found: dict[str, Any] = {}
    if "throughput" in results:
        t = results["throughput"]
        found["throughput"] = {
            "hpk_per_s": t["hpk"]["rate_per_s"],
            "plain_loop_per_s": t["plain_loop"]["rate_per_s"],
            "ratio": t["ratio"],
            "met": t["met"],
        }
    if "lag" in results:
        lag = results["lag"]["lag_s"]
        found["lag"] = {k: lag[k] for k in ("p50", "p95", "p99")} | {"met": results["lag"]["met"]}
    if "load" in results:
        found["load"] = {
            str(step["live_pods"]): step["commands_per_minute"] for step in results["load"]["sizes"]
        } | {"met": results["load"]["met"]}
    if "footprint" in results:
        f = results["footprint"]
        found["footprint"] = {"rss_mb": f["rss_mb"], "cpu_share": f["cpu_share"], "met": f["met"]}
    if "start" in results:
        parts = results["start"]["parts_s"]
        found["start_p50_s"] = {name: parts[name]["p50"] for name in parts} | {
            "met": results["start"]["met"]
        }
    return found


def _write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
