"""Reading the conformance suite's JUnit report into passed / total and the failures' reasons."""

from __future__ import annotations

from pathlib import Path

from hpk.testbed import conformance

REPORT = """\
<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="4" disabled="380" errors="0" failures="1" time="100.5">
  <testsuite name="Kubernetes e2e suite" package="/" tests="4" failures="1" time="100.5">
    <testcase name="[SynchronizedBeforeSuite]" status="passed" time="1.2"/>
    <testcase name="[It] [sig-network] DNS should provide DNS for services [Conformance]"
      status="passed" time="30.1"/>
    <testcase
      name="[It] [sig-network] Services should serve a basic endpoint from pods [Conformance]"
      status="failed" time="60.0">
      <failure message="timed out waiting for the condition&#xA;more detail" type="failed">
        [FAILED] timed out</failure>
    </testcase>
    <testcase name="[It] [sig-apps] Deployment should run [Conformance]" status="skipped" time="0">
      <skipped message="skipped"/>
    </testcase>
  </testsuite>
</testsuites>
"""


def test_the_report_gives_each_tests_outcome_and_reason(tmp_path: Path) -> None:
    report = tmp_path / "junit_01.xml"
    report.write_text(REPORT)
    results = conformance.junit_results(report)
    assert [(r.name, r.outcome) for r in results] == [
        ("[SynchronizedBeforeSuite]", "passed"),
        ("[sig-network] DNS should provide DNS for services [Conformance]", "passed"),
        ("[sig-network] Services should serve a basic endpoint from pods [Conformance]", "failed"),
        ("[sig-apps] Deployment should run [Conformance]", "skipped"),
    ]
    assert results[2].reason == "timed out waiting for the condition"
    assert conformance.summary(results).splitlines() == [
        "1 / 2 passed",
        "FAILED [sig-network] Services should serve a basic endpoint from pods [Conformance]: "
        "timed out waiting for the condition",
    ]


def test_a_failed_suite_setup_is_named_though_it_is_not_a_test(tmp_path: Path) -> None:
    report = tmp_path / "junit_01.xml"
    report.write_text(
        REPORT.replace(
            'name="[SynchronizedBeforeSuite]" status="passed" time="1.2"/>',
            'name="[SynchronizedBeforeSuite]" status="failed">'
            '<failure message="no nodes"/></testcase>',
        )
    )
    lines = conformance.summary(conformance.junit_results(report)).splitlines()
    assert lines[0] == "1 / 2 passed"
    assert "FAILED [SynchronizedBeforeSuite]: no nodes" in lines


def test_the_run_leaves_out_what_hpk_does_not_offer(tmp_path: Path) -> None:
    args = conformance.e2e_arguments(
        kubeconfig=tmp_path / "kubeconfig",
        report_dir=tmp_path / "report",
        focus=conformance.FOCUS,
        skip=conformance.SKIP,
    )
    assert f"--kubeconfig={tmp_path / 'kubeconfig'}" in args
    assert f"--ginkgo.focus={conformance.FOCUS}" in args
    for left_out in ("NodePort", "LoadBalancer", "IPv6", "Serial", "Disruptive"):
        assert left_out in conformance.SKIP
