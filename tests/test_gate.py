"""The gate's decision rules and its JUnit report, from plain rows (no model needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from pixeldefend.gate import GatePolicy, JUnitWriter, Tally, decide, xml_safe


def row(verdict: str, kind: str | None = None) -> dict:
    scored = verdict in ("clean", "anomalous")
    return {"path": f"{verdict}.png", "verdict": verdict,
            "bits_per_dim": 1.5 if scored else None, "score": 1.5 if scored else None,
            "p_value": 0.5 if scored else None, "error": None if scored else "bad",
            "error_kind": kind}


def tally(clean=0, anomalous=0, unreadable=0, invalid=0) -> Tally:
    t = Tally()
    for r in ([row("clean")] * clean + [row("anomalous")] * anomalous
              + [row("error", "read")] * unreadable + [row("error", "score")] * invalid):
        t.add(r)
    return t


@pytest.mark.parametrize("counts, policy, exit_code", [
    ((15, 5, 0, 0), GatePolicy(max_anomalous_fraction=0.5), 0),
    ((15, 5, 0, 0), GatePolicy(max_anomalous_fraction=0.2), 1),
    ((15, 5, 0, 0), GatePolicy(fail_on_anomalous=True), 1),
    ((15, 5, 0, 0), GatePolicy(), 0),
    ((20, 0, 1, 0), GatePolicy(fail_on_anomalous=True), 1),
    ((20, 0, 1, 0), GatePolicy(fail_on_anomalous=True, skip_unreadable=True), 0),
    ((20, 0, 0, 1), GatePolicy(fail_on_anomalous=True, skip_unreadable=True), 1),
    ((20, 0, 1, 0), GatePolicy(), 2),
    ((20, 0, 1, 0), GatePolicy(skip_unreadable=True), 0),
    ((20, 0, 0, 1), GatePolicy(skip_unreadable=True), 2),
    ((0, 0, 3, 0), GatePolicy(max_anomalous_fraction=0.5, skip_unreadable=True), 1),
])
def test_decide_fails_closed(counts, policy, exit_code):
    assert decide(tally(*counts), policy).exit_code == exit_code


@pytest.mark.parametrize("policy, rows", [
    (GatePolicy(max_anomalous_fraction=0.5), [row("clean")] * 15 + [row("anomalous")] * 5),
    (GatePolicy(fail_on_anomalous=True), [row("clean"), row("anomalous")]),
    (GatePolicy(), [row("clean"), row("error", "read")]),
    (GatePolicy(fail_on_anomalous=True, skip_unreadable=True),
     [row("clean"), row("error", "read")]),
])
def test_junit_has_a_failure_or_error_exactly_when_the_exit_code_is_not_zero(
        tmp_path, policy, rows):
    t, writer = Tally(), JUnitWriter(tmp_path / "r.xml", "bpd", policy)
    for r in rows:
        t.add(r)
        writer.add(r)
    result = decide(t, policy)
    writer.close(result)
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    bad = int(suite.get("failures")) + int(suite.get("errors"))
    assert (bad > 0) == (result.exit_code != 0)
    assert int(suite.get("tests")) == len(rows) + 1  # + the gate case


def test_xml_safe_escapes_control_characters_and_undecodable_bytes():
    assert xml_safe("a\x1bb\udcffc\x00") == "a\\x1bb\\xffc\\x00"
    assert xml_safe("tab\tnewline\n ok é") == "tab\tnewline\n ok é"


def test_policy_from_options_reads_fail_on_and_rejects_unknown_choices():
    from pixeldefend.errors import UsageError
    from pixeldefend.gate import GatePolicy

    policy = GatePolicy.from_options("anomalous", max_anomalous_fraction=0.1,
                                     skip_unreadable=True)
    assert (policy.fail_on_anomalous, policy.max_anomalous_fraction,
            policy.skip_unreadable, policy.batch_test) == (True, 0.1, True, False)
    assert not GatePolicy.from_options().active
    with pytest.raises(UsageError, match="fail_on must be one of"):
        GatePolicy.from_options("anything")
