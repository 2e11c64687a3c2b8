"""The CI gate of `score`: pass or fail from the result rows and the user's policy, and a
JUnit report that always agrees with the exit code.

Fail closed: with a gate set, an input that could not be scored (unreadable file, or a
non-finite score) fails the gate, because nobody knows whether it was anomalous. The
user may accept unreadable inputs explicitly (`skip_unreadable`); they are then counted
and reported as skipped. A non-finite score is never skippable: it means the model (or
the image) is broken.

JUnit semantics (one report = one test suite):
- one `gate` test case, failed exactly when the gate failed, its message the reasons;
- one test case per input: an `error` for an unscored input that counts (every unreadable
  input unless skipped, every non-finite score), `skipped` for a skipped one, a `failure`
  for an anomalous image only when single anomalous images fail the gate (`--fail-on
  anomalous` without `--batch-test`); otherwise the verdict goes into `system-out`;
- with `--batch-test`, one `batch typicality test` case, failed when it fails the gate.
So the report has a failure or an error exactly when the exit code is not 0.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from xml.sax.saxutils import escape, quoteattr

from .atomic import atomic_path

EXIT_OK, EXIT_GATE, EXIT_USAGE = 0, 1, 2

# characters XML 1.0 cannot hold at all (not even escaped)
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_safe(text: str) -> str:
    """Replace characters XML cannot hold (control characters, undecodable bytes held as
    surrogates) by visible escapes such as \\x1b."""
    def sub(match: re.Match[str]) -> str:
        code = ord(match.group())
        if 0xDC80 <= code <= 0xDCFF:
            code -= 0xDC00
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _NOT_XML.sub(sub, text)


@dataclass(frozen=True)
class GatePolicy:
    """What the user asked the gate to enforce."""

    fail_on_anomalous: bool = False
    max_anomalous_fraction: float | None = None
    batch_test: bool = False
    skip_unreadable: bool = False

    @property
    def active(self) -> bool:
        return self.fail_on_anomalous or self.max_anomalous_fraction is not None

    @property
    def per_image(self) -> bool:
        """Does a single anomalous image fail the gate?"""
        return self.fail_on_anomalous and not self.batch_test

    @classmethod
    def from_options(cls, fail_on: str = "none", **options: Any) -> GatePolicy:
        """The policy `score` and `merge` take as options: `fail_on` is "none" or
        "anomalous" (GATE_CHOICES); `options` the other fields."""
        from .defaults import GATE_CHOICES
        from .errors import UsageError

        if fail_on not in GATE_CHOICES:
            raise UsageError(f"fail_on must be one of {', '.join(GATE_CHOICES)}, not "
                             f"{fail_on!r}", param="fail_on")
        return cls(fail_on_anomalous=fail_on == "anomalous", **options)


@dataclass
class Tally:
    """Running counts of result rows (so nothing per image has to be kept)."""

    n: int = 0
    clean: int = 0
    anomalous: int = 0
    uncalibrated: int = 0
    unreadable: int = 0
    invalid: int = 0  # non-finite scores

    def add(self, row: dict[str, Any]) -> None:
        self.n += 1
        verdict = row["verdict"]
        if verdict == "error":
            if row.get("error_kind") == "score":
                self.invalid += 1
            else:
                self.unreadable += 1
        elif verdict in ("clean", "anomalous", "uncalibrated"):
            setattr(self, verdict, getattr(self, verdict) + 1)

    @property
    def errors(self) -> int:
        return self.unreadable + self.invalid

    @property
    def scored(self) -> int:
        return self.clean + self.anomalous

    def summary(self, policy: GatePolicy, hidden: int = 0) -> dict[str, int]:
        skipped = self.unreadable if policy.skip_unreadable else 0
        return {"n": self.n, "clean": self.clean, "anomalous": self.anomalous,
                "errors": self.errors, "skipped": skipped, "hidden_ignored": hidden}


@dataclass
class GateResult:
    failed: bool
    reasons: list[str] = field(default_factory=list)
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {"failed": self.failed, "reasons": list(self.reasons),
                "exit_code": self.exit_code}


def decide(tally: Tally, policy: GatePolicy, batch_anomalous: bool | None = None,
           batch_reason: str = "") -> GateResult:
    """Pass or fail, with reasons, and the exit code (0 pass, 1 gate failed, 2 inputs that
    could not be scored when no gate was set)."""
    reasons: list[str] = []
    if policy.active:
        if policy.per_image and tally.anomalous:
            reasons.append(f"{tally.anomalous} anomalous image(s)")
        if policy.batch_test and policy.fail_on_anomalous and batch_anomalous:
            reasons.append(batch_reason or "batch is atypical")
        if policy.max_anomalous_fraction is not None and tally.scored:
            fraction = tally.anomalous / tally.scored
            if fraction > policy.max_anomalous_fraction:
                reasons.append(f"anomalous fraction {fraction:.3f} > "
                               f"{policy.max_anomalous_fraction:g}")
        if tally.invalid:
            reasons.append(f"{tally.invalid} image(s) with a non-finite score")
        if tally.unreadable and not policy.skip_unreadable:
            reasons.append(f"{tally.unreadable} input(s) could not be read (pass "
                           "skip_unreadable=True to let the gate skip them)")
        if tally.scored == 0:
            reasons.append("no image could be scored")
        return GateResult(bool(reasons), reasons, EXIT_GATE if reasons else EXIT_OK)
    if tally.invalid or (tally.unreadable and not policy.skip_unreadable):
        return GateResult(False, [], EXIT_USAGE)
    return GateResult(False, [], EXIT_OK)


class JUnitWriter:
    """Streams one JUnit test case per row to a temporary file, then writes the report
    (atomically) once the gate is decided, so memory stays flat for any number of rows."""

    def __init__(self, path: Path, kind: str, policy: GatePolicy) -> None:
        self.path = Path(path)
        self.kind = kind
        self.policy = policy
        self.body: IO[str] = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.tests = self.failures = self.errors = self.skipped = 0

    def _case(self, name: str, child: str = "") -> None:
        self.tests += 1
        self.body.write(f'    <testcase classname="pixeldefend.score" '
                        f'name={quoteattr(xml_safe(name))}>{child}</testcase>\n')

    @staticmethod
    def _element(tag: str, message: str, kind: str) -> str:
        return f"<{tag} message={quoteattr(xml_safe(message))} type={quoteattr(kind)} />"

    @staticmethod
    def _out(text: str) -> str:
        return f"<system-out>{escape(xml_safe(text))}</system-out>"

    def add(self, row: dict[str, Any]) -> None:
        verdict = row["verdict"]
        if verdict == "error":
            message = row.get("error") or "unreadable"
            if row.get("error_kind") != "score" and self.policy.skip_unreadable:
                self.skipped += 1
                self._case(row["path"], self._element("skipped", message, "unreadable"))
            else:
                self.errors += 1
                self._case(row["path"], self._element(
                    "error", message, "invalid-score" if row.get("error_kind") == "score"
                    else "unreadable"))
            return
        line = f"bits/dim {row['bits_per_dim']:.4f}, {self.kind} score {row['score']:.4f}"
        if row.get("p_value") is not None:
            line += f", p-value {row['p_value']:.4f}"
        if verdict == "anomalous" and self.policy.per_image:
            self.failures += 1
            self._case(row["path"], self._element(
                "failure", f"{self.kind} score above threshold ({line})", "anomalous"))
        else:
            note = "" if verdict != "anomalous" else " (within the gate's policy)"
            self._case(row["path"], self._out(f"{verdict}{note}: {line}"))

    def close(self, result: GateResult, batch_test: dict[str, Any] | None = None,
              batch_line: str = "") -> None:
        """Write the report: the per-input cases, the batch test case and the gate case."""
        if batch_test is not None:
            if self.policy.fail_on_anomalous and batch_test.get("anomalous"):
                self.failures += 1
                self._case("batch typicality test",
                           self._element("failure", batch_line, "atypical"))
            else:
                self._case("batch typicality test", self._out(batch_line))
        if result.failed:
            self.failures += 1
            self._case("gate", self._element("failure", "gate failed: "
                                             + "; ".join(result.reasons), "gate"))
        else:
            self._case("gate", self._out("gate passed" if self.policy.active
                                         else "no gate set"))
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as out:
            out.write('<?xml version="1.0" encoding="utf-8"?>\n<testsuites>\n')
            out.write(f'  <testsuite name="pixeldefend.score" tests="{self.tests}" '
                      f'failures="{self.failures}" errors="{self.errors}" '
                      f'skipped="{self.skipped}">\n')
            self.body.seek(0)
            shutil.copyfileobj(self.body, out)
            out.write("  </testsuite>\n</testsuites>\n")
        self.body.close()
