"""Sharded inference: torchrun ranks and `--shard I/N` + `merge` give the one-process output
(same rows, same order, same verdicts, same exit code), each process reading only its block."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pixeldefend.cli import app
from pixeldefend.data import ImageSpec, ImageStream, load_images, save_image, save_npz
from pixeldefend.distributed import Dist
from pixeldefend.sharding import Sharding

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits"
SPEC = ImageSpec(1, 8, 8, 17)


def run(runner, *args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder: 4 clean digits, an unreadable file, 2 foreign images, and an .npz of 5
    digits that the shard blocks cut through."""
    folder = tmp_path_factory.mktemp("shard-inputs")
    digits = load_images("digits:test[:9]")
    for k in range(4):
        save_image(folder / f"a_clean_{k}.png", digits.images[k], 17)
    (folder / "b_broken.png").write_bytes(b"not a png")
    save_image(folder / "c_inverted.png", 16 - digits.images[0], 17)
    noise = np.random.default_rng(0).integers(0, 17, (1, 8, 8))
    save_image(folder / "d_noise.png", torch.from_numpy(noise), 17)
    save_npz(folder / "e_digits.npz", digits.images[4:9], 17, digits.labels[4:9])
    return folder


def test_restricted_stream_reads_only_its_block(inputs, monkeypatch):
    import pixeldefend.data as data

    decoded: list[str] = []
    real = data.decode_image_file
    def spy(path, *args, **kwargs):
        decoded.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data, "decode_image_file", spy)
    everything = [name for name, *_ in ImageStream([str(inputs)], SPEC).items()]
    assert len(everything) == 12  # 7 files + 5 images of the .npz
    blocks = []
    for index in range(3):
        stream = ImageStream([str(inputs)], SPEC)
        stream.restrict(Sharding(Dist(), (index, 3)).window)
        decoded.clear()
        blocks.append([name for name, *_ in stream.items()])
        assert len(decoded) <= len([n for n in blocks[-1] if n.endswith(".png")])
    assert sum(blocks, []) == everything
    assert [len(b) for b in blocks] == [4, 4, 4]


def same(got: object, want: object) -> bool:
    """Equal, except floats within 1e-6 (float32 sums depend a little on batch make-up)."""
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, float | int) and abs(got - want) < 1e-6  # type: ignore[operator]
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and \
            all(same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and \
            all(same(a, b) for a, b in zip(got, want, strict=True))
    return got == want


def parse(path: Path, fmt: str) -> object:
    text = path.read_text()
    if fmt == "json":
        return json.loads(text)
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines()]
    rows = list(csv.reader(text.splitlines()))
    return [[float(v) if re.fullmatch(r"-?\d+\.\d+(e-?\d+)?", v) else v for v in row]
            for row in rows]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_shards_merge_into_the_one_process_output(runner, inputs, tmp_path, fmt):
    gate = ["--fail-on", "anomalous"]
    one = run(runner, "score", inputs, "-m", MODEL, "-f", fmt, "-o", tmp_path / f"one.{fmt}",
              *gate)
    shards = []
    for index in range(3):
        shards.append(tmp_path / f"s{index}.{fmt}")
        run(runner, "score", inputs, "-m", MODEL, "-f", fmt, "-o", shards[-1],
            "--shard", f"{index}/3", *gate)
    merged = run(runner, "merge", *shards, "-o", tmp_path / f"merged.{fmt}", *gate)
    assert one.exit_code == merged.exit_code == 1  # anomalous images and an unreadable file
    want = parse(tmp_path / f"one.{fmt}", fmt)
    assert same(parse(tmp_path / f"merged.{fmt}", fmt), want)
    assert len(want["results"] if fmt == "json" else want) == 12 + (fmt == "csv")
    # the gate is recomputed over all rows: without a gate the unreadable file exits 2
    assert run(runner, "merge", *shards, "-o", tmp_path / "nogate.json", "-f", fmt
               if fmt == "json" else "jsonl").exit_code == 2


def test_merge_refuses_mixed_or_foreign_files(runner, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"path": "x", "verdict": "clean"}\n')
    (tmp_path / "b.txt").write_text("hello\n")
    result = run(runner, "merge", tmp_path / "a.jsonl", tmp_path / "b.txt")
    assert result.exit_code == 2 and "not a score output" in result.output


def torchrun(*args: object, cwd: Path, launcher: str = "torch.distributed.run"
             ) -> subprocess.CompletedProcess:
    """2 ranks of `pixeldefend *args` under `launcher` (torchrun, or pixeldefend.launch)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PIXELDEFEND_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", launcher, "--nproc-per-node", "2",
               "--standalone", "-m", "pixeldefend", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def rank_exit_codes(stderr: str) -> list[int]:
    """The per-rank exit codes of torchrun's failure summary (it exits 1 itself)."""
    return [int(code) for code in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", stderr, re.M)]


def test_torchrun_score_matches_one_process(runner, inputs, tmp_path):
    args = [inputs, "-m", MODEL, "-f", "jsonl", "--fail-on", "anomalous"]
    one = run(runner, "score", *args, "-o", tmp_path / "one.jsonl",
              "--junit", tmp_path / "one.xml")
    two = torchrun("score", *args, "-o", tmp_path / "two.jsonl", "--junit",
                   tmp_path / "two.xml", cwd=tmp_path)
    assert one.exit_code == 1
    assert two.returncode != 0 and rank_exit_codes(two.stderr) == [1, 1], two.stderr
    rows = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    assert [r["verdict"] for r in rows] == [r["verdict"] for r in expected]
    for got, want in zip(rows, expected, strict=True):
        if want["bits_per_dim"] is not None:
            assert abs(got["bits_per_dim"] - want["bits_per_dim"]) < 1e-6
    assert rows[4]["verdict"] == "error" and rows[4]["path"].endswith("b_broken.png")
    assert (tmp_path / "two.xml").read_text() == (tmp_path / "one.xml").read_text()
    assert "gate failed" in two.stderr and two.stdout.count("{") == 0  # rank 0 wrote -o


def test_torchrun_score_passes_like_one_process(runner, tmp_path):
    args = ["digits:test[:30]", "-m", MODEL, "-f", "json", "--max-anomalous-fraction", "0.5"]
    one = run(runner, "score", *args)
    two = torchrun("score", *args, cwd=tmp_path)
    assert one.exit_code == two.returncode == 0, two.stderr
    got, want = json.loads(two.stdout), json.loads(one.stdout)
    assert [r["path"] for r in got["results"]] == [r["path"] for r in want["results"]]
    assert np.allclose([r["bits_per_dim"] for r in got["results"]],
                       [r["bits_per_dim"] for r in want["results"]], rtol=0, atol=1e-6)
    assert got["summary"] == want["summary"] and got["gate"] == want["gate"]


def test_torchrun_purify_writes_the_same_images(runner, inputs, tmp_path):
    one = run(runner, "purify", inputs, "-m", MODEL, "--out", tmp_path / "one", "-f", "json")
    two = torchrun("purify", inputs, "-m", MODEL, "--out", tmp_path / "two", "-f", "json",
                   cwd=tmp_path)
    assert one.exit_code == 2 and rank_exit_codes(two.stderr) == [2, 2], two.stderr
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*")
                   if p.is_file() and p.suffix in (".png", ".npz"))
    assert len(files) == 7  # 6 readable PNGs, the .npz, nothing for the broken file
    for rel in files:
        if rel.suffix == ".png":
            assert (tmp_path / "two" / rel).read_bytes() == (tmp_path / "one" / rel).read_bytes()
        else:
            with np.load(tmp_path / "one" / rel) as a, np.load(tmp_path / "two" / rel) as b:
                assert np.array_equal(a["images"], b["images"])
                assert np.array_equal(a["labels"], b["labels"])
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text())["images"]
                 for d in ("one", "two")]
    assert [(r["path"], r["changed"], r["error"]) for r in manifests[0]] == \
        [(r["path"], r["changed"], r["error"]) for r in manifests[1]]


def test_decoding_workers_keep_order_and_error_rows(inputs):
    def items(workers: int, shard: tuple[int, int]) -> list[tuple]:
        stream = ImageStream([str(inputs)], SPEC, workers=workers)
        stream.restrict(Sharding(Dist(), shard).window)
        return [(name, None if image is None else image.tobytes(), label, error)
                for name, image, label, error in stream.items()]

    for shard in [(0, 1), (1, 3)]:  # everything; a block starting mid-folder
        serial = items(0, shard)
        assert items(2, shard) == serial
    errors = [(name, error) for name, _, _, error in items(2, (0, 1)) if error]
    assert len(errors) == 1 and errors[0][0].endswith("b_broken.png")


def test_bench_reports_a_throughput_line_per_rank():
    from pixeldefend.bench import BenchSettings, sharded_scoring, sharded_scoring_lines

    settings = BenchSettings(batch_size=32, cases=("digits",), model=MODEL, threads=1)
    doc = sharded_scoring(settings, 100, Sharding(Dist(), (1, 2)))  # block 1 of 2: 50 images
    assert doc["world"] == 1 and [r["images"] for r in doc["ranks"]] == [50]
    lines = sharded_scoring_lines(doc)
    assert lines[0].startswith("rank 0/1: 50 images") and lines[-1].startswith("total: 50")


def test_an_unreadable_array_file_is_one_error_row_across_shards(tmp_path):
    digits = load_images("digits:test[:6]")
    folder = tmp_path / "in"
    folder.mkdir()
    save_image(folder / "a.png", digits.images[0], 17)
    # the header declares 6 images, so the blocks count them, but the labels do not match
    save_npz(folder / "b.npz", digits.images, 17, digits.labels[:4])
    save_image(folder / "c.png", digits.images[1], 17)

    def names(shard: tuple[int, int]) -> list[tuple[str, bool]]:
        stream = ImageStream([str(folder)], SPEC)
        stream.restrict(Sharding(Dist(), shard).window)
        return [(name, error is None) for name, _, _, error in stream.items()]

    whole = names((0, 1))
    assert whole == [(str(folder / "a.png"), True), (str(folder / "b.npz"), False),
                     (str(folder / "c.png"), True)]
    for count in (2, 3, 4):
        assert sum((names((i, count)) for i in range(count)), []) == whole


def test_defend_and_purify_shards_concatenate_to_one_process(runner, inputs, tmp_path):
    classifier = REPO / "models" / "digits-classifier"
    args = ["defend", inputs, "-m", MODEL, "-c", classifier, "-f", "jsonl"]
    one = run(runner, *args, "-o", tmp_path / "one.jsonl")
    shards = [run(runner, *args, "--shard", f"{i}/2", "-o", tmp_path / f"s{i}.jsonl")
              for i in range(2)]
    assert one.exit_code == 2 and [s.exit_code for s in shards] == [2, 0]  # broken file in 0
    joined = sum((parse(tmp_path / f"s{i}.jsonl", "jsonl") for i in range(2)), [])
    assert same(joined, parse(tmp_path / "one.jsonl", "jsonl"))
    run(runner, "purify", inputs, "-m", MODEL, "--out", tmp_path / "p")
    for i in range(2):
        run(runner, "purify", inputs, "-m", MODEL, "--out", tmp_path / f"p{i}", "--shard",
            f"{i}/2")
    assert (tmp_path / "p0" / "a_clean_0.png").read_bytes() == \
        (tmp_path / "p" / "a_clean_0.png").read_bytes()
    assert not (tmp_path / "p1" / "a_clean_0.png").exists()
    with np.load(tmp_path / "p" / "e_digits.npz") as whole, \
            np.load(tmp_path / "p1" / "e_digits.npz") as part:
        assert np.array_equal(part["images"], whole["images"])  # block 1 holds the whole .npz


def test_torchrun_evaluate_splits_attacks_and_purification_with_the_same_results(runner, tmp_path):
    args = ["evaluate", "--data", "digits:test", "-n", "16", "--attacks", "fgsm,pgd",
            "--batch-size", "8", "--eps", "2",
            "--eps-levels", "--eps-defend", "1", "--defences", "none,purify",
            "--adaptive-attack", "none", "-m", MODEL, "-c", REPO / "models" / "digits-classifier",
            "-f", "json"]
    one = run(runner, *args, "--out", tmp_path / "one")
    two = torchrun(*args, "--out", tmp_path / "two", cwd=tmp_path)
    assert one.exit_code == two.returncode == 0, two.stderr

    def results(folder: str) -> dict:
        doc = json.loads((tmp_path / folder / "results.json").read_text())
        doc["config"] = {k: v for k, v in doc["config"].items() if k not in ("command", "out")}
        for row in doc["rows"]:  # wall times differ
            (row.get("summary") or {}).pop("seconds", None)
        return {k: v for k, v in doc.items() if k not in ("timing", "created")}

    got, want = results("two"), results("one")
    assert got.keys() == want.keys()
    assert [k for k in want if not same(got[k], want[k])] == []
    for name in ("purify-clean-e1", "purify-fgsm-eps2-e1"):
        stages = [np.load(tmp_path / d / "cache" / f"{name}.npz") for d in ("one", "two")]
        assert np.array_equal(stages[0]["images"], stages[1]["images"])
    stages = [np.load(tmp_path / d / "cache" / "attack-pgd-eps2.npz") for d in ("one", "two")]
    assert np.array_equal(stages[0]["adversarial"], stages[1]["adversarial"])  # 1 batch/rank


def test_torchrun_attack_matches_one_process(runner, tmp_path):
    """pgd's random starts are seeded per batch, so 2 ranks (3 batches: 2 on rank 0, 1 on
    rank 1) write the one-process folder: same manifest rows and arrays, same summary."""
    args = ["attack", "--data", "digits:test", "-n", "40", "--method", "pgd", "--steps", "2",
            "--eps", "2", "--eps-levels", "--batch-size", "16", "--seed", "3", "-f", "json",
            "-c", REPO / "models" / "digits-classifier"]
    one = run(runner, *args, "--out", tmp_path / "one")
    two = torchrun(*args, "--out", tmp_path / "two", cwd=tmp_path)
    assert one.exit_code == two.returncode == 0, two.stderr
    assert two.stdout.count('"method"') == 1  # rank 0 alone printed the summary

    def summary(doc: dict) -> dict:
        return {k: v for k, v in doc.items() if k not in ("seconds", "out")}

    assert summary(json.loads(two.stdout)) == summary(json.loads(one.stdout))
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two")]
    assert manifests[1]["images"] == manifests[0]["images"]
    assert summary(manifests[1]) == summary(manifests[0])
    with np.load(tmp_path / "one" / "images.npz") as a, \
            np.load(tmp_path / "two" / "images.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
        assert (a["images"] != a["clean"]).any()  # the attack did something
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one").iterdir())


def launch(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m pixeldefend.launch`: torchrun's arguments, pixeldefend's exit code."""
    return torchrun(*args, cwd=cwd, launcher="pixeldefend.launch")


def test_the_launcher_tells_a_failed_gate_from_an_unreadable_input(inputs, tmp_path):
    gate_failed = launch("score", inputs, "-m", MODEL, "-f", "json", "--fail-on", "anomalous",
                         cwd=tmp_path)
    unreadable = launch("score", inputs, "-m", MODEL, "-f", "json", cwd=tmp_path)
    assert gate_failed.returncode == 1, gate_failed.stderr
    assert unreadable.returncode == 2, unreadable.stderr  # torchrun itself exits 1 for both
    assert json.loads(unreadable.stdout)["gate"]["exit_code"] == 2


def test_the_launcher_takes_rank_zeros_code_and_fails_closed_on_signals():
    from types import SimpleNamespace as Failure

    from pixeldefend.launch import exit_code_of

    assert exit_code_of({0: Failure(exitcode=2), 1: Failure(exitcode=-15)}) == 2
    assert exit_code_of({1: Failure(exitcode=1)}) == 1
    assert exit_code_of({0: Failure(exitcode=-9), 1: Failure(exitcode=-15)}) == 2
