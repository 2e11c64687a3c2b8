"""`pixeldefend bench` runs end to end and reports consistent figures (no timing asserts)."""

from __future__ import annotations

import csv
import io
import json

from pixeldefend.bench import peak_memory_mb
from pixeldefend.cli import app
from pixeldefend.rendering import BENCH_COLUMNS, bench_rows, rows_to_csv


def test_bench_json_on_the_shipped_digits_model(runner, repo, monkeypatch):
    monkeypatch.chdir(repo)
    # --reference-budget 0: the reference runs in full however busy the machine is, so
    # the bit-identity check below never depends on timing
    result = runner.invoke(app, ["bench", "--quick", "--cases", "digits", "--no-train-step",
                                 "--reference-budget", "0", "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (row,) = doc["results"]
    assert row["shape"] == [1, 8, 8] and row["levels"] == 17
    # 64 sub-pixels run in full, so the reference is not extrapolated and must match
    assert row["identical"] is True and not row["reference_extrapolated"]
    assert abs(row["speedup_fast_vs_reference"] - row["reference_s"] / row["fast_s"]) < 1e-9
    assert row["peak_memory_mb"] > 10
    # exact purification against the one-pass approximation, timed in the same run
    assert abs(row["fast_over_approx"] - row["fast_s"] / row["approx_s"]) < 1e-9
    assert abs(row["fast_over_score"] - row["fast_s"] / row["score_best_s"]) < 1e-9
    assert row["score_best_s"] <= row["score_s"]
    assert 0.0 <= row["approx_mismatch"] <= 1.0
    # roofline: rates from the FLOP counter, shares of the same run's matmul rate
    assert row["matmul_gflops"] > 0 and row["train_gflops"] is None
    assert abs(row["score_vs_matmul"] - row["score_gflops"] / row["matmul_gflops"]) < 1e-9
    assert abs(row["score_gflops"] * row["score_s"] / 64
               - row["forward_gflop_per_image"]) < 1e-9
    assert abs(row["score_speedup_vs_plain"] - row["score_plain_s"] / row["score_s"]) < 1e-9
    assert row["train_speedup_vs_plain"] is None and row["train_step_plain_s"] is None
    assert doc["system"]["threads"] >= 1 and doc["settings"]["reference_budget_s"] is None
    # --format csv: one real row per case (the shape as CxHxW, no dict reprs)
    (csv_row,) = csv.DictReader(io.StringIO(rows_to_csv(bench_rows(doc), BENCH_COLUMNS)))
    assert csv_row["shape"] == "1x8x8" and csv_row["levels"] == "17"
    assert float(csv_row["fast_images_per_s"]) == row["fast_images_per_s"]


def test_bench_budget_is_honoured_and_zero_means_none():
    from pixeldefend.bench import BenchSettings

    assert BenchSettings().budget() == 20.0 and BenchSettings(quick=True).budget() == 4.0
    assert BenchSettings(quick=True, reference_budget=0).budget() == 0


def test_peak_memory_grows_with_a_large_allocation():
    import numpy as np

    before = peak_memory_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert peak_memory_mb() >= before
    assert peak_memory_mb() > 64 and block.sum() > 0
