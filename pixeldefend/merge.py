"""Join the outputs of `score --shard I/N` runs into exactly the one-process output.

Each shard of a job array writes its own JSON, JSONL or CSV. Given in shard order, the
rows concatenate to the one-process rows (blocks are contiguous and in input order); what
a shard cannot know is the verdict over every input, so the summary and the gate are
recomputed here over all rows, with the gate policy given again (JSONL and CSV do not
store it). The batch typicality test needs the bundle's clean bits/dim: pass the model.
A JUnit report is not merged: it is one file per run; rerun the gate here instead.

    merged = merge_score_outputs(["s0.json", "s1.json"], GatePolicy(fail_on_anomalous=True))
    merged.run.result.exit_code, merged.document, merged.rows
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .gate import GatePolicy, decide
from .reporting import SCORE_COLUMNS
from .scoring import _SCORED, ScoreRun

_SCORE_ERROR = "non-finite score ("  # how score_rows words an error_kind 'score' row


@dataclass
class ShardOutput:
    """One shard's output file: its format, its rows and (JSON only) its document."""

    path: Path
    fmt: str  # json | jsonl | csv
    rows: list[dict[str, Any]]
    document: dict[str, Any] | None = None


@dataclass
class MergedScores:
    """All shards' rows in order, the recomputed gate, and the JSON document (when the
    shards wrote JSON)."""

    fmt: str  # the output format: as asked, else the shards'
    run: ScoreRun
    document: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


def read_shard_output(path: Path) -> ShardOutput:
    """A `score` output file in any of its machine formats (told apart by content)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    head = text.lstrip()[:1]
    try:
        if head == "{" and "\n{" not in text.strip():
            doc = json.loads(text)
            if isinstance(doc, dict) and isinstance(doc.get("results"), list):
                return ShardOutput(path, "json", doc["results"], doc)
        if head == "{":
            return ShardOutput(path, "jsonl", [json.loads(line) for line in text.splitlines()
                                               if line.strip()])
    except ValueError as exc:
        raise UsageError(f"{path}: not a score JSON / JSONL output ({exc})") from None
    if text.split("\n", 1)[0] == ",".join(SCORE_COLUMNS):
        rows = list(csv.DictReader(text.splitlines()))
        for row in rows:
            row["error_kind"] = None if row["verdict"] != "error" else (
                "score" if row["error"].startswith(_SCORE_ERROR) else "read")
        return ShardOutput(path, "csv", rows)
    if not text.strip():  # a JSONL shard with no inputs in its block
        return ShardOutput(path, "jsonl", [])
    raise UsageError(f"{path}: not a score output in JSON, JSONL or CSV")


def merge_score_outputs(paths: Sequence[str | Path], policy: GatePolicy | None = None, *,
                        model: str | Path | None = None, resamples: int = 1000,
                        seed: int = 0, fmt: str | None = None, output: Path | None = None,
                        overwrite: bool = False) -> MergedScores:
    """Concatenate the shards' rows (give them in shard order: 0/N, 1/N, ...) and decide
    the gate over all of them. `model`: the bundle, needed by `policy.batch_test`; `fmt`:
    the format to write (default: the shards'; table and json need JSON shards);
    `output`: checked before anything is read (never a shard, `overwrite` to replace)."""
    from .outputs import check_files, input_paths

    check_files((output, "--output"), inputs=input_paths(*map(str, paths)),
                overwrite=overwrite)
    policy = policy or GatePolicy()
    shards = [read_shard_output(Path(p)) for p in paths]
    if not shards:
        raise UsageError("merge needs at least one shard output")
    formats = {s.fmt for s in shards}
    if len(formats) > 1:
        raise UsageError(f"shard outputs mix formats ({', '.join(sorted(formats))}): "
                         "merge outputs of one format")
    fmt = fmt or formats.pop()
    docs = [s.document for s in shards if s.document is not None]
    header = _common_header(docs, shards) if docs else None
    kind = header["score_kind"] if header else "score"
    run = ScoreRun(kind, None, policy)
    for shard in shards:
        for row in shard.rows:
            run.tally.add(row)
            run.rows.append(row)
    run.hidden = docs[0]["summary"].get("hidden_ignored", 0) if docs else 0
    batch_anomalous, reason = None, ""
    if policy.batch_test:
        batch_anomalous, reason = _batch_test(run, model, resamples, seed)
    run.result = decide(run.tally, policy, batch_anomalous, reason)
    document = None
    if header is not None:
        document = {k: v for k, v in header.items() if k not in ("batch_test", "gate")}
        document["results"], document["summary"] = run.rows, run.summary
        if policy.batch_test:
            document["batch_test"] = run.batch_test
        document["gate"] = run.result.to_dict()
    elif fmt in ("json", "table"):
        raise UsageError(f"fmt {fmt} needs shard outputs in JSON", param="fmt")
    return MergedScores(fmt, run, document, run.rows)


def _common_header(docs: list[dict[str, Any]], shards: list[ShardOutput]) -> dict[str, Any]:
    """The shards' shared fields (model, score kind, threshold); they must agree."""
    keys = ("model", "score_kind", "threshold", "target_fpr")
    first = {k: docs[0].get(k) for k in keys}
    for shard in shards[1:]:
        assert shard.document is not None
        other = {k: shard.document.get(k) for k in keys}
        if other != first:
            raise UsageError(f"{shard.path} was scored with another model or threshold "
                             f"({other}) than {shards[0].path} ({first}): not one run")
    return docs[0]


def _batch_test(run: ScoreRun, model: str | Path | None, resamples: int,
                seed: int) -> tuple[bool | None, str]:
    """The whole-set typicality test over the merged bits/dim (as `score --batch-test`)."""
    import numpy as np

    from .detector import DensityDetector
    from .reporting import batch_test_entry, batch_test_line

    if model is None:
        raise UsageError("batch_test: the merged typicality test needs the model bundle "
                         "(its clean calibration bits/dim): pass model", param="batch_test")
    bpd = np.array([float(r["bits_per_dim"]) for r in run.rows if r["verdict"] in _SCORED])
    if not len(bpd):
        return None, ""
    test = DensityDetector.load(model, device="cpu").batch_test(bpd=bpd, resamples=resamples,
                                                               seed=seed)
    run.batch_test = batch_test_entry(test)
    run.batch_line = batch_test_line(run.batch_test)
    return test.anomalous, f"batch is atypical (p-value {test.p_value:.4f} <= {test.alpha:g})"
