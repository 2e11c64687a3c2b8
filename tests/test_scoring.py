"""The score pipeline from Python (`scoring.score_inputs`), and the CLI's thin rendering
of it: CSV for info and bench, the per-command --threads, errors naming flags."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pixeldefend.cli import app
from pixeldefend.data import save_image
from pixeldefend.detector import DensityDetector
from pixeldefend.errors import UsageError
from pixeldefend.gate import GatePolicy
from pixeldefend.scoring import score_inputs


def run(runner, *args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def detector(tiny_bundle):
    return DensityDetector.load(tiny_bundle, device="cpu")


def test_score_inputs_rows_tally_and_gate(detector, tmp_path):
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 17, (1, 8, 8)))
    save_image(tmp_path / "noise.png", noise, 17)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    seen: list[int] = []
    totals: list[int] = []
    run_ = score_inputs(detector, ["digits:test[:6]", str(tmp_path)],
                        GatePolicy(fail_on_anomalous=True), kind="bpd",
                        batch_size=4, progress=seen.append, on_total=totals.append)
    assert totals == [8] and sum(seen) == 8 and len(run_.rows) == 8
    verdicts = {r["path"].rsplit("/", 1)[-1]: r["verdict"] for r in run_.rows}
    assert verdicts["noise.png"] == "anomalous" and verdicts["broken.png"] == "error"
    assert run_.summary["n"] == 8 and run_.summary["errors"] == 1
    assert run_.result.failed and run_.result.exit_code == 1
    doc = run_.document("m")
    assert doc["score_kind"] == "bpd" and doc["gate"]["exit_code"] == 1
    assert len(doc["results"]) == 8 and "batch_test" not in doc


def test_score_inputs_streams_without_keeping_rows(detector):
    batches: list[int] = []
    run_ = score_inputs(detector, ["digits:test[:10]"], kind="bpd", batch_size=3,
                        keep_rows=False, on_rows=lambda rows: batches.append(len(rows)))
    assert batches == [3, 3, 3, 1] and run_.rows == []
    assert run_.result.exit_code == 0 and not run_.policy.active


def test_score_inputs_batch_test_and_junit(detector, tmp_path):
    report = tmp_path / "r.xml"
    run_ = score_inputs(detector, ["digits:test[:40]"], GatePolicy(batch_test=True),
                        kind="bpd", junit=report, resamples=200)
    assert run_.batch_test is not None and "p_value" in run_.batch_test
    assert run_.document("m")["batch_test"] == run_.batch_test
    assert 'name="batch typicality test"' in report.read_text()


def test_score_inputs_errors_name_parameters(detector):
    with pytest.raises(UsageError, match="no images found"):
        score_inputs(detector, [], kind="bpd")
    with pytest.raises(UsageError, match="unknown score kind"):
        score_inputs(detector, ["digits:test[:2]"], kind="nope")
    with pytest.raises(UsageError, match="no calibration for 'complexity'"):
        score_inputs(detector, ["digits:test[:2]"], GatePolicy(fail_on_anomalous=True),
                     kind="complexity")


def test_library_errors_show_flags_in_the_cli(runner, tiny_bundle):
    result = run(runner, "calibrate", "--model", tiny_bundle, "--fpr", "1.5")
    assert result.exit_code == 2 and "--fpr must be between 0 and 1" in result.stderr
    from pixeldefend.training_pipeline import check_fpr

    with pytest.raises(UsageError, match="^fpr must be between 0 and 1") as info:
        check_fpr(2.0)
    assert info.value.param == "fpr"


def test_score_threads_option_is_the_global_one(runner, tiny_bundle, monkeypatch):
    applied: list[int] = []
    monkeypatch.setattr("pixeldefend.cli.common.apply_threads", applied.append)
    result = run(runner, "score", "digits:test[:3]", "--model", tiny_bundle, "--score", "bpd",
                 "--threads", "1", "--format", "json")
    assert result.exit_code == 0 and applied == [1]
    assert "--threads" in run(runner, "score", "--help").stdout


def help_text(runner, *command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_score_help_lists_choices(runner):
    text = help_text(runner, "score")
    assert "<none|anomalous>" in text and "<bpd|complexity|llr|typicality|dose>" in text
    assert "<bpd|complexity|llr|typicality|dose>" in help_text(runner, "calibrate")


@pytest.mark.parametrize("command", ["train", "train-background", "calibrate", "score",
                                     "info", "sample", "bench"])
def test_density_flags_show_no_bool_metavar(runner, command):
    lines = [ln for ln in help_text(runner, command).splitlines() if "<bool>" in ln]
    assert all("--help" in ln for ln in lines), lines


def test_info_csv_is_field_value_rows(runner, tiny_bundle):
    result = run(runner, "info", "--model", tiny_bundle, "--format", "csv")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    values = {r["field"]: r["value"] for r in rows}
    assert list(rows[0]) == ["field", "value"]
    assert values["levels"] == "17" and values["image_shape"] == "1 8 8"
    assert float(values["calibration.bpd.threshold"]) > 0
    assert not any(v.startswith("{") for v in values.values())
    doc = json.loads(run(runner, "info", "--model", tiny_bundle, "--format", "json").stdout)
    assert float(values["calibration.bpd.threshold"]) == doc["calibration"]["bpd"]["threshold"]


def test_cli_message_turns_parameters_into_flags():
    from pixeldefend.cli.common import cli_message
    from pixeldefend.errors import DataError

    assert cli_message(UsageError("fpr must be between 0 and 1", param="fpr")) == \
        "--fpr must be between 0 and 1"
    assert cli_message(DataError("set data_root to their folder, or set download",
                                 param=("data_root", "download"))) == \
        "set --data-root to their folder, or set --download"
    assert cli_message(UsageError("factory_weights is only for module:factory classifiers",
                                  param="factory_weights")).startswith("--classifier-weights ")
    # only whole words: a parameter inside another name or path is left alone
    assert cli_message(UsageError("eps 2 with eps_levels, see eps_defend", param="eps")) == \
        "--eps 2 with eps_levels, see eps_defend"
    assert cli_message(UsageError("plain message")) == "plain message"
    # on/off parameters as `name=True`, and an output's leading label, become flags; the
    # same words inside a path stay
    from pixeldefend.outputs import OutputError, prepare_dir

    assert cli_message(DataError("model expects 8x8; pass resize=True to convert")) == \
        "model expects 8x8; pass --resize to convert"
    error = OutputError.at("out", "out out/run is a file, not a folder; pass overwrite=True")
    assert cli_message(error) == "--out out/run is a file, not a folder; pass --overwrite"
    assert cli_message(OutputError.at("--out", "--out x is a file")) == "--out x is a file"
    with pytest.raises(OutputError) as caught:
        prepare_dir(Path(__file__), command="t")
    assert str(caught.value).startswith("out ") and "--" not in str(caught.value)
