"""`python -m bench.rootfs`: what a container's writable root file system costs.

Every pod container runs contained (kubelet_py.pod.render.CONTAIN_OPTIONS), and its writes to the
image's own file system succeed and vanish at its end (`--writable-tmpfs`). This measures, for
the same image and the same user, side by side in one run:

- `read-only`: contained, no writable layer (`readOnlyRootFilesystem: true`);
- `writable-tmpfs`: contained, with the tmpfs overlay hpk uses;
- `overlay-dir`: contained, with an overlay on a fresh folder of the node's disk (`--overlay
  DIR`), the alternative;

each as the start of `true` (wall time, p50 and p90, and the peak resident memory of the
largest process), and the time to write 16 MiB into /var/lib (the writable layer) and into
/tmp (each container's folder on the node's disk, `--workdir`).

    python -m bench.rootfs [--runs 20] [--user hpk-e2e] [--out FILE]

As root it runs Apptainer as `--user` (an ordinary user, as on a real site); the user must
exist. Writes bench/results/<date>-rootfs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hpk.apptainer import pod_options
from hpk.testbed.images import ensure_test_images
from hpk.toolchain import Toolchain
from kubelet_py.pod.render import CONTAIN_OPTIONS, WRITABLE_ROOT

RESULTS = Path(__file__).resolve().parent / "results"
IMAGE = "docker.io/library/busybox:latest"
WRITE_MIB = 16
VARIANTS = ("read-only", "writable-tmpfs", "overlay-dir")


def _as_user(user: pwd.struct_passwd | None) -> list[str]:
    return [] if user is None else ["runuser", "-u", user.pw_name, "--"]


def _run(argv: Sequence[str], *, user: pwd.struct_passwd | None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) of the largest process, and the output of one run."""
    began = time.monotonic()
    process = subprocess.Popen(
        [*_as_user(user), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    output = process.stdout.read().decode(errors="replace")
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - began
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}): {output}")
    return elapsed, usage.ru_maxrss, output


def measure(
    *, apptainer: str, sif: Path, runs: int, user: pwd.struct_passwd | None, scratch: Path
) -> dict[str, Any]:
    uid = os.geteuid() if user is None else user.pw_uid
    base = [apptainer, "--quiet", "exec", *pod_options(uid), *CONTAIN_OPTIONS, "--no-home"]
    results: dict[str, Any] = {}
    for variant in VARIANTS:
        starts, peaks, writes_root, writes_tmp = [], [], [], []
        for index in range(runs):
            work = Path(tempfile.mkdtemp(prefix=f"{variant}-{index}-", dir=scratch))
            for name in ("tmp", "var_tmp", "upper"):
                (work / name).mkdir(mode=0o1777)
            if user is not None:
                shutil.chown(work, user.pw_uid, user.pw_gid)
                for name in ("tmp", "var_tmp", "upper"):
                    shutil.chown(work / name, user.pw_uid, user.pw_gid)
            layer = {
                "read-only": [],
                "writable-tmpfs": [WRITABLE_ROOT],
                "overlay-dir": ["--overlay", str(work / "upper")],
            }[variant]
            line = [*base, *layer, "--workdir", str(work), str(sif)]
            elapsed, peak, _ = _run([*line, "true"], user=user)
            starts.append(elapsed)
            peaks.append(peak)
            if variant != "read-only":
                script = (
                    f"mkdir -p /var/lib/bench && dd if=/dev/zero of=/var/lib/bench/f bs=1M "
                    f"count={WRITE_MIB} 2>/dev/null"
                )
                writes_root.append(_run([*line, "sh", "-c", script], user=user)[0] - elapsed)
            script = f"dd if=/dev/zero of=/tmp/f bs=1M count={WRITE_MIB} 2>/dev/null"
            writes_tmp.append(_run([*line, "sh", "-c", script], user=user)[0] - elapsed)
            shutil.rmtree(work, ignore_errors=True)
        results[variant] = {
            "start_s": _spread(starts),
            "peak_rss_mib": round(max(peaks) / 1024, 1),
            f"write_{WRITE_MIB}mib_root_extra_s": _spread(writes_root) if writes_root else None,
            f"write_{WRITE_MIB}mib_tmp_extra_s": _spread(writes_tmp),
        }
    plain = results["read-only"]["start_s"]["p50"]
    for variant in VARIANTS[1:]:
        results[variant]["start_p50_over_read_only_s"] = round(
            results[variant]["start_s"]["p50"] - plain, 3
        )
    return results


def _spread(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p90": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))], 3),
        "n": len(ordered),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rootfs", description=__doc__)
    parser.add_argument("--runs", type=int, default=20, help="runs of each variant")
    parser.add_argument("--user", default="hpk-e2e", help="the user Apptainer runs as, as root")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    args = parser.parse_args(argv)
    user = pwd.getpwnam(args.user) if os.geteuid() == 0 else None
    apptainer = str(Toolchain.load().binary("apptainer"))
    sif = ensure_test_images()[IMAGE]
    scratch = Path(tempfile.mkdtemp(prefix="hpk-bench-rootfs-", dir="/var/tmp"))
    scratch.chmod(0o755)
    try:
        found = measure(apptainer=apptainer, sif=sif, runs=args.runs, user=user, scratch=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    now = datetime.now(UTC)
    out = args.out or RESULTS / f"{now:%Y-%m-%d}-rootfs.json"
    results = {
        "date": now.isoformat(timespec="seconds"),
        "user": args.user if user is not None else pwd.getpwuid(os.geteuid()).pw_name,
        "image": IMAGE,
        "runs": args.runs,
        "variants": found,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
