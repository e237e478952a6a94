"""Draw a benchmark results JSON as one PNG: `python -m bench.chart RESULTS.json [OUT.png]`.

One panel per measurement, each with its target drawn in; a measurement missing from the
results leaves its panel with a note. Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

COMMANDS = ("squeue", "sacct", "scontrol", "sinfo")
START_PARTS = ("api", "kubelet", "slurm", "container", "status")


def draw(results_path: Path, out: Path | None = None) -> Path:
    """Draw the chart of a results file; returns the PNG's path (default: next to it)."""
    results = json.loads(results_path.read_text())
    out = out or results_path.with_suffix(".png")
    figure, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = axes.flatten()
    _throughput(panels[0], results.get("throughput"))
    _lag(panels[1], results.get("lag"))
    _load(panels[2], results.get("load"))
    _footprint(panels[3], panels[4], results.get("footprint"))
    _start(panels[5], results.get("start"))
    machine = results.get("machine") or {}
    figure.suptitle(
        f"hpk benchmark, {results.get('date', '?')} ({results.get('mode', '?')} run, "
        f"{machine.get('cpus', '?')} CPUs, commit {machine.get('commit', '?')})"
    )
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def _missing(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _throughput(ax: Axes, data: dict[str, Any] | None) -> None:
    title = "Submission throughput"
    if not data:
        return _missing(ax, title)
    names = ["hpk", "plain sbatch loop"]
    rates = [data["hpk"]["rate_per_s"], data["plain_loop"]["rate_per_s"]]
    bars = ax.bar(names, rates, color=["tab:blue", "tab:gray"])
    ax.bar_label(bars, fmt="%.1f")
    ax.axhline(0.9 * rates[1], color="tab:red", linestyle="--", label="target: 0.9 x plain")
    ax.set_ylabel("jobs submitted per second")
    ax.set_title(f"{title}: {data['pods']} pods, ratio {data['ratio']:.2f}")
    ax.legend(loc="lower right")
    return None


def _lag(ax: Axes, data: dict[str, Any] | None) -> None:
    title = "Status lag"
    if not data:
        return _missing(ax, title)
    lag = data["lag_s"]
    names = ["p50", "p95", "p99"]
    bars = ax.bar(names, [lag[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f")
    ax.plot([-0.4, 0.4], [1.0, 1.0], color="tab:red", linestyle="--", label="target p50 1 s")
    ax.plot([1.6, 2.4], [2.0, 2.0], color="tab:red", linestyle=":", label="target p99 2 s")
    ax.set_ylabel("seconds, container exit -> status seen")
    ax.set_title(f"{title}: {data['pods']} pods")
    ax.legend(loc="upper left")
    return None


def _load(ax: Axes, data: dict[str, Any] | None) -> None:
    title = "Slurm commands per minute"
    if not data:
        return _missing(ax, title)
    steps = data["sizes"]
    width = 0.8 / max(1, len(steps))
    for index, step in enumerate(steps):
        values = [step["commands_per_minute"][c] for c in COMMANDS]
        xs = [i + (index - (len(steps) - 1) / 2) * width for i in range(len(COMMANDS))]
        bars = ax.bar(xs, values, width, label=f"{step['live_pods']} live pods")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(60, color="tab:red", linestyle="--", label="target: squeue <= 60/min")
    ax.set_xticks(range(len(COMMANDS)), list(COMMANDS))
    ax.set_ylabel("calls per minute")
    ax.set_title(title)
    ax.legend(loc="upper right")
    return None


def _footprint(memory: Axes, cpu: Axes, data: dict[str, Any] | None) -> None:
    if not data:
        _missing(memory, "Kubelet memory")
        _missing(cpu, "Kubelet CPU")
        return
    steps = data.get("by_size") or [data]
    labels = [f"{step['live_pods']} pods" for step in steps]
    bars = memory.bar(labels, [step["rss_mb"] for step in steps], color="tab:blue")
    memory.bar_label(bars, fmt="%.0f")
    memory.axhline(250, color="tab:red", linestyle="--", label="target 250 MB")
    memory.set_ylabel("resident memory, MB")
    memory.set_title("Kubelet memory (RSS)")
    memory.legend(loc="upper left")
    own = [100 * step["cpu_share"] for step in steps]
    total = [100 * step["cpu_share_with_slurm_commands"] for step in steps]
    xs = range(len(steps))
    cpu.bar([x - 0.2 for x in xs], own, 0.4, label="kubelet", color="tab:blue")
    cpu.bar([x + 0.2 for x in xs], total, 0.4, label="with its Slurm commands", color="tab:cyan")
    cpu.axhline(10, color="tab:red", linestyle="--", label="target 10%")
    cpu.set_xticks(list(xs), labels)
    cpu.set_ylabel("% of one core")
    cpu.set_title("Kubelet CPU, pods settled")
    cpu.legend(loc="upper left")


def _start(ax: Axes, data: dict[str, Any] | None) -> None:
    title = "Pod start, p50 by part"
    if not data:
        return _missing(ax, title)
    parts = data["parts_s"]
    left = 0.0
    for name in START_PARTS:
        value = max(0.0, float(parts[name]["p50"]))
        ax.barh(["p50"], [value], left=left, label=f"{name} {value * 1000:.0f} ms")
        left += value
    ax.axvline(0.1, color="tab:red", linestyle="--", label="kubelet target 100 ms")
    ax.set_ylim(-0.6, 1.6)  # room for the legend above the bar
    ax.set_xlabel("seconds from create to Running seen")
    ax.set_title(f"{title}: {data['pods']} pods, total p50 {parts['total']['p50']:.2f} s")
    ax.legend(loc="upper right", fontsize=8)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2:
        print("usage: python -m bench.chart RESULTS.json [OUT.png]", file=sys.stderr)
        return 2
    out = draw(Path(args[0]), Path(args[1]) if len(args) == 2 else None)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
