"""Kubernetes' own conformance tests of `[sig-network]`, run against an hpk cluster.

`e2e.test` is the suite upstream runs to certify a cluster; the toolchain builds it, and
agnhost, the program of most of its test images, from the pinned k8s.io/kubernetes (the
`kubernetes-e2e` part). The suite pulls its images from registry.k8s.io, which no machine
here reaches, so the images the network tests use are made locally and imported into the
user's image cache under the names the suite asks for, as an air-gapped site would:

- `e2e-test-images/agnhost`: the built agnhost on a Debian root filesystem with the tools
  the tests run beside it (container/conformance-images/agnhost.def);
- `e2e-test-images/jessie-dnsutils`: the same file; its tests give their own command and
  need only dig and getent;
- `e2e-test-images/busybox`: the host's static busybox, as the test bed's busybox;
- `pause`: agnhost alone, running `agnhost pause` (it ends on TERM, as pause does).

Their tags are those test/utils/image/manifest.go of Kubernetes 1.33 gives. Images that the
chosen tests do not use (nginx, httpd, ...) are not made; a test that needs one fails with
ErrImagePull, and the summary says so.

`junit_results` and `summary` read the JUnit report the suite writes, so that a run ends in
"passed / total" and the reason of each failure. tests/e2e/test_conformance.py runs it: a
small set in the test suite, every `[sig-network]` conformance test in `make conformance`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from hpk.docker_archive import folder, regular_file, write_docker_archive
from hpk.files import held_lock
from hpk.paths import container_dir
from hpk.testbed.images import TestImage, TestImageBuildFailed, build_image, busybox_entries
from hpk.toolchain import Toolchain, tools_dir

E2E_REGISTRY = "registry.k8s.io/e2e-test-images"
AGNHOST = f"{E2E_REGISTRY}/agnhost:2.53"
JESSIE_DNSUTILS = f"{E2E_REGISTRY}/jessie-dnsutils:1.7"
BUSYBOX = f"{E2E_REGISTRY}/busybox:1.36.1-1"
PAUSE = "registry.k8s.io/pause:3.10"

FOCUS = r"\[sig-network\].*\[Conformance\]"
SKIP = r"NodePort|LoadBalancer|IPv6|\[Serial\]|\[Disruptive\]"
"""What the conformance run leaves out: NodePorts and load balancers, which hpk does not
offer, IPv6, and the tests that must run alone or break the cluster on purpose."""


def recipes_dir() -> Path:
    return container_dir() / "conformance-images"


def images_dir(toolchain: Toolchain) -> Path:
    """Where the built images live, keyed by the recipe, the suite's pin and Apptainer's."""
    digest = hashlib.sha256()
    for key in ("KUBERNETES_VERSION", "APPTAINER_VERSION"):
        digest.update(f"{key}={toolchain.pins[key]}\n".encode())
    for path in sorted(recipes_dir().iterdir()):
        digest.update(path.name.encode() + b"\n" + path.read_bytes())
    return tools_dir() / f"conformance-images-{digest.hexdigest()[:16]}"


def ensure_conformance_images(
    toolchain: Toolchain, progress: Callable[[str], None] = print
) -> dict[str, Path]:
    """Build the images that are not cached yet (root: debootstrap); reference -> file (a
    SIF, or a docker-archive `.tar` that `hpk images import` converts)."""
    agnhost = toolchain.binary("agnhost")
    target = images_dir(toolchain)
    wanted = {
        AGNHOST: target / "agnhost.sif",
        JESSIE_DNSUTILS: target / "agnhost.sif",
        BUSYBOX: target / "busybox.tar",
        PAUSE: target / "pause.tar",
    }
    if all(path.is_file() for path in wanted.values()):
        return wanted
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o755)
    with held_lock(target / ".build.lock"):
        if not wanted[BUSYBOX].is_file():
            write_docker_archive(
                wanted[BUSYBOX], entries=busybox_entries(), config={"Cmd": ["sh"]}, tags=[BUSYBOX]
            )
        if not wanted[PAUSE].is_file():
            write_docker_archive(
                wanted[PAUSE],
                entries=[regular_file("agnhost", agnhost.read_bytes(), 0o755), folder("tmp")],
                config={"Entrypoint": ["/agnhost", "pause"]},
                tags=[PAUSE],
            )
        if not wanted[AGNHOST].is_file():
            if os.geteuid() != 0:
                raise TestImageBuildFailed(f"{AGNHOST} is not built, and building needs root")
            progress(f"building {AGNHOST} (debootstrap, a few minutes)")
            build_image(
                TestImage("agnhost", AGNHOST, "agnhost.def"),
                target=wanted[AGNHOST],
                apptainer=toolchain.binary("apptainer"),
                recipes=recipes_dir(),
                environment={"HPK_AGNHOST": str(agnhost)},
            )
    return wanted


def e2e_arguments(*, kubeconfig: Path, report_dir: Path, focus: str, skip: str) -> list[str]:
    """`e2e.test`'s arguments for a run against the cluster of `kubeconfig`."""
    return [
        f"--kubeconfig={kubeconfig}",
        "--provider=skeleton",
        f"--report-dir={report_dir}",
        f"--ginkgo.focus={focus}",
        f"--ginkgo.skip={skip}",
        "--ginkgo.no-color",
        "--ginkgo.timeout=4h",
        "--disable-log-dump",
        # Slurm jobs start in seconds, not the milliseconds of a container runtime; the
        # suite's own timeouts (minutes) already allow for that.
        "--node-schedulable-timeout=5m",
    ]


@dataclass(frozen=True)
class Result:
    name: str
    outcome: str
    """passed, failed or skipped."""
    reason: str
    """The first line of the failure's message; empty otherwise."""
    seconds: float


_LEADING_LABELS = re.compile(r"^\[It\]\s*")


def junit_results(report: Path) -> list[Result]:
    """The tests of a JUnit report the suite wrote, in its order."""
    results = []
    # The report is the one the suite we ran wrote, not input from elsewhere.
    for case in ElementTree.parse(report).getroot().iter("testcase"):  # noqa: S314
        name = _LEADING_LABELS.sub("", case.get("name", ""))
        seconds = float(case.get("time") or 0)
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is not None:
            text = (failure.get("message") or failure.text or "").strip()
            reason = text.splitlines()[0] if text else "failed"
            results.append(Result(name, "failed", reason, seconds))
        elif case.find("skipped") is not None:
            results.append(Result(name, "skipped", "", seconds))
        else:
            results.append(Result(name, "passed", "", seconds))
    return results


def summary(results: list[Result]) -> str:
    """passed / total, then one line per test that failed, with its reason."""
    ran = [r for r in results if r.outcome != "skipped" and not _is_suite_node(r.name)]
    passed = [r for r in ran if r.outcome == "passed"]
    lines = [f"{len(passed)} / {len(ran)} passed"]
    failed = [r for r in results if r.outcome == "failed"]
    lines += [f"FAILED {r.name}: {r.reason}" for r in failed]
    return "\n".join(lines)


def _is_suite_node(name: str) -> bool:
    """The suite's setup and teardown nodes, which the report lists beside the tests."""
    return name.startswith(("[SynchronizedBeforeSuite]", "[SynchronizedAfterSuite]", "[Report"))
