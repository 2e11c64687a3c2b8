"""Adversarial corpus (issue 10): malformed images, arrays, bundles, calibration files,
data specs and CLI misuse, built on the fly in tmp_path (no committed binaries).

Every case asserts the exit code, the error text, that no traceback escaped, and for
per-file errors that the good file in the same call was still scored. Uses the shipped
tiny digits bundle (models/digits), so the whole file runs in seconds.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from pixeldefend import data as data_module
from pixeldefend.cli import app
from pixeldefend.data import load_images, save_image, training_splits
from pixeldefend.errors import DataError

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits"


def run(runner, *args):
    # catch_exceptions=False: any exception escaping the CLI fails the test
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def no_traceback(result) -> None:
    assert "Traceback" not in result.stdout and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def good_png(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    path = folder / "good.png"
    save_image(path, load_images("digits:test[:1]").images[0], 17)
    return path


def png_bytes(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save)
    return buf.getvalue()


def digit_8bit() -> np.ndarray:
    return (load_images("digits:test[:1]").images[0, 0].numpy().astype(np.float64)
            * 255 / 16).round().astype(np.uint8)


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows)
            + png_chunk(b"IEND", b""))


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def npy_declaring(shape: tuple[int, ...]) -> bytes:
    """An .npy header declaring `shape` uint8, followed by only 64 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\x00" * 64


def digits_npz(**extra: np.ndarray) -> bytes:
    images = load_images("digits:test[:4]").images.numpy()
    return npz_bytes(images=images, levels=np.array(17), **extra)


def tiff_pages(n: int) -> bytes:
    frames = [Image.fromarray(digit_8bit()) for _ in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def gif_frames(n: int) -> bytes:
    frames = [Image.fromarray((digit_8bit() // (k + 1)).astype(np.uint8)) for k in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


def zip_bomb() -> bytes:
    """4 MB of zeros per member, compressed to a few KB (the budget is lowered in the test)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", npy_bytes(np.zeros((65536, 8, 8), dtype=np.uint8)))
    return buf.getvalue()


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


# name -> (file name, how to make it (bytes or a function of the path), expected error text)
FILE_CASES: dict[str, tuple[str, bytes | Callable[[Path], None], str]] = {
    "empty png": ("empty.png", b"", "empty file"),
    "garbage png": ("garbage.png", b"hello, not an image", "not an image"),
    "truncated png": ("trunc.png", png_bytes(digit_8bit())[:40], "truncated"),
    "png bomb 20000x20000": ("bomb.png", png_declaring(20000, 20000), "budget"),
    "png 5000x5000 over budget": ("big.png", png_declaring(5000, 5000), "budget"),
    "16-bit png": ("deep.png", png_bytes(np.full((8, 8), 4000, dtype=np.uint16)), "16-bit"),
    "transparent png": ("alpha.png", png_bytes(np.zeros((8, 8, 4), dtype=np.uint8)),
                        "transparent"),
    "rgb png": ("rgb.png", png_bytes(np.zeros((8, 8, 3), dtype=np.uint8)), "channel"),
    "wrong size png": ("size.png", png_bytes(np.zeros((28, 28), dtype=np.uint8)),
                       "expects 8x8"),
    "multi-page tiff": ("pages.tiff", tiff_pages(3), "has 3 frames"),
    "animated gif": ("anim.gif", gif_frames(2), "has 2 frames"),
    "truncated jpeg": ("cut.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 10, "JPEG"),
    "corrupt bmp": ("junk.bmp", b"BM" + b"\x01" * 30, "truncated"),
    "npy header 1e11 bytes": ("huge.npy", npy_declaring((100_000_000_000,)), "budget"),
    "npy truncated": ("short.npy", npy_declaring((100, 8, 8)), "truncated"),
    "npy float": ("float.npy", npy_bytes(np.full((2, 8, 8), 0.5)), "uint8"),
    "npy objects": ("obj.npy", npy_bytes(np.array([None, 1], dtype=object), True), "objects"),
    "npy 5-d": ("fived.npy", npy_bytes(np.zeros((1, 1, 1, 8, 8), dtype=np.uint8)),
                "not a stack of images"),
    "npy garbage": ("garbage.npy", b"\x93NUMPY garbage", "not a valid .npy"),
    "npz truncated": ("trunc.npz", digits_npz()[:200], "cannot read"),
    "npz not a zip": ("fake.npz", b"PK but not really a zip", "cannot read"),
    "npz empty images": ("empty.npz", npz_bytes(images=np.zeros((0, 8, 8), np.uint8)),
                         "holds no images"),
    "npz no images key": ("nokey.npz", npz_bytes(pixels=np.zeros((2, 8, 8), np.uint8)),
                          "no 'images'"),
    "npz short labels": ("labels.npz", digits_npz(labels=np.array([1, 2])), "'labels' has"),
    "npz string labels": ("strlab.npz", digits_npz(labels=np.array(["a", "b", "c", "d"])),
                          "'labels' must be integers"),
    "npz 2-d labels": ("lab2d.npz", digits_npz(labels=np.zeros((4, 2), np.int64)),
                       "'labels' has shape"),
    "npz array levels": ("lev.npz", npz_bytes(images=np.zeros((2, 8, 8), np.uint8),
                                              levels=np.array([17, 17])), "single integer"),
    "npz levels 300": ("lev300.npz", npz_bytes(images=np.zeros((2, 8, 8), np.uint8),
                                               levels=np.array(300)), "between 2 and 256"),
    "npz string levels": ("levstr.npz", npz_bytes(images=np.zeros((2, 8, 8), np.uint8),
                                                  levels=np.array("17")), "single integer"),
    "npz wrong shape": ("shape.npz", npz_bytes(images=np.zeros((2, 16, 16), np.uint8)),
                        "model expects"),
    "npz values above levels": ("over.npz", npz_bytes(images=np.full((2, 8, 8), 20, np.uint8),
                                                      levels=np.array(17)), "only 17 levels"),
    "npz negative images": ("neg.npz", npz_bytes(images=np.full((2, 8, 8), -1, np.int16)),
                            "uint8"),
    "fifo": ("pipe.png", make_fifo, "not a regular file"),
    "dangling symlink": ("dangling.png", lambda p: p.symlink_to(p.parent / "gone.png"),
                         "dangling symbolic link"),
    "missing file": ("missing.png", lambda p: None, "no such file"),
    "empty folder": ("emptydir", lambda p: p.mkdir(), "folder holds no image files"),
}


def make(path: Path, how: bytes | Callable[[Path], None]) -> None:
    if isinstance(how, bytes):
        path.write_bytes(how)
    else:
        how(path)


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_malformed_file_is_an_error_row_and_the_good_file_is_scored(
        case, runner, tmp_path, good_png):
    name, how, text = FILE_CASES[case]
    bad = tmp_path / name
    make(bad, how)
    result = run(runner, "score", good_png, bad, "--model", MODEL, "--format", "json")
    no_traceback(result)
    assert result.exit_code == 2, result.stderr
    doc = json.loads(result.stdout)
    rows = doc["results"]
    assert rows[0]["path"] == str(good_png) and rows[0]["verdict"] in ("clean", "anomalous")
    errors = [r for r in rows if r["verdict"] == "error"]
    assert len(errors) == 1 and text in errors[0]["error"], errors
    assert doc["summary"]["errors"] == 1
    # the same input with a gate fails it (exit 1), and --skip-unreadable lets it pass
    gated = run(runner, "score", good_png, bad, "--model", MODEL, "--fail-on", "anomalous",
                "--format", "csv")
    no_traceback(gated)
    assert gated.exit_code == 1 and "could not be read" in gated.stderr
    if rows[0]["verdict"] == "clean":
        skipped = run(runner, "score", good_png, bad, "--model", MODEL, "--fail-on",
                      "anomalous", "--skip-unreadable", "--format", "csv")
        assert skipped.exit_code == 0 and "skipped by --skip-unreadable" in skipped.stderr


def test_npz_zip_bomb_is_refused_from_the_zip_directory(runner, tmp_path, good_png,
                                                        monkeypatch):
    monkeypatch.setattr(data_module, "MAX_ARRAY_BYTES", 1 << 20)
    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(zip_bomb())
    assert bomb.stat().st_size < 20_000
    result = run(runner, "score", good_png, bomb, "--model", MODEL, "--format", "json")
    no_traceback(result)
    assert result.exit_code == 2
    rows = json.loads(result.stdout)["results"]
    assert rows[0]["verdict"] != "error" and "budget" in rows[1]["error"]


# ------------------------------------------------------------------------ folder scans


def folder_with_good(tmp_path: Path, good_png: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good_png, folder / "a_good.png")
    return folder


FOLDER_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "unknown extension": (lambda f: (f / "notes.txt").write_text("hi"),
                          "unsupported file type .txt"),
    "no extension": (lambda f: (f / "README").write_text("hi"), "(no extension)"),
    "dangling symlink inside": (lambda f: (f / "b_link.png").symlink_to(f / "nowhere.png"),
                                "dangling symbolic link"),
    "symlink loop": (lambda f: (f / "loop").symlink_to(f), "symbolic link loop"),
    "fifo inside": (lambda f: os.mkfifo(f / "pipe.png"), "not a regular file"),
    "corrupt png in a sub-folder": (lambda f: ((f / "sub").mkdir(),
                                               (f / "sub" / "x.png").write_bytes(b"x")),
                                    "not an image"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_folder_scan_reports_what_it_cannot_read(case, runner, tmp_path, good_png):
    folder = folder_with_good(tmp_path, good_png)
    how, text = FOLDER_CASES[case]
    how(folder)
    result = run(runner, "score", folder, "--model", MODEL, "--format", "jsonl")
    no_traceback(result)
    assert result.exit_code == 2
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["verdict"] != "error" for r in rows].count(True) == 1  # the good file
    assert any(r["verdict"] == "error" and text in r["error"] for r in rows), rows


def test_unreadable_sub_folder_is_an_error_row(runner, tmp_path, good_png, monkeypatch):
    folder = folder_with_good(tmp_path, good_png)
    locked = folder / "locked"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path):  # chmod 000 does not stop root, so refuse the listing directly
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(data_module.os, "scandir", scandir)
    result = run(runner, "score", folder, "--model", MODEL, "--format", "json")
    no_traceback(result)
    assert result.exit_code == 2
    rows = json.loads(result.stdout)["results"]
    assert rows[0]["verdict"] != "error"
    assert any("cannot list folder: Permission denied" in (r["error"] or "") for r in rows)


def test_hidden_entries_are_ignored_but_counted(runner, tmp_path, good_png):
    folder = folder_with_good(tmp_path, good_png)
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / ".git").mkdir()
    (folder / ".git" / "x.png").write_bytes(b"junk")
    result = run(runner, "score", folder, "--model", MODEL, "--format", "json")
    no_traceback(result)
    doc = json.loads(result.stdout)
    assert result.exit_code == 0 and doc["summary"]["n"] == 1
    assert doc["summary"]["hidden_ignored"] == 2
    assert "2 hidden file(s)/folder(s) ignored" in result.stderr


# ---------------------------------------------------------------- names and JUnit XML


@pytest.mark.parametrize("raw", [b"ctl\x1b[31m\x07.png", b"latin\xe9\xff.png"])
def test_hostile_file_names_give_valid_json_csv_and_junit(runner, tmp_path, good_png, raw):
    folder = folder_with_good(tmp_path, good_png)
    bad = os.path.join(os.fsencode(folder), raw)
    with open(bad, "wb") as fh:
        fh.write(b"not an image")
    shutil.copy(good_png, os.fsdecode(os.path.join(os.fsencode(folder), b"z" + raw)))
    report = tmp_path / "report.xml"
    result = run(runner, "score", folder, "--model", MODEL, "--format", "json",
                 "--junit", report)
    no_traceback(result)
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert all(name.isprintable() for name in (r["path"] for r in doc["results"]))
    assert sum(r["verdict"] != "error" for r in doc["results"]) == 2
    suite = ET.parse(report).getroot().find("testsuite")  # parses: valid XML
    names = [case.get("name") for case in suite.findall("testcase")]
    assert any("\\x" in name for name in names)
    assert suite.get("errors") == "1"
    for fmt in ("csv", "table", "jsonl"):
        other = run(runner, "score", folder, "--model", MODEL, "--format", fmt)
        no_traceback(other)
        assert other.exit_code == 2


def junit_counts(path: Path) -> tuple[int, int, int]:
    suite = ET.parse(path).getroot().find("testsuite")
    return int(suite.get("failures")), int(suite.get("errors")), int(suite.get("skipped"))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """16 clean test digits and 4 noise images, which the digits model flags."""
    folder = tmp_path_factory.mktemp("mixed")
    clean = load_images("digits:calib[:16]")
    for k in range(16):
        save_image(folder / f"clean_{k:02d}.png", clean.images[k], 17)
    rng = np.random.default_rng(0)
    for k in range(4):
        save_image(folder / f"noise_{k}.png", rng.integers(0, 17, (1, 8, 8)), 17)
    return folder


@pytest.mark.parametrize("gate, skip, with_bad", [
    (["--max-anomalous-fraction", "0.5"], False, False),
    (["--max-anomalous-fraction", "0.1"], False, False),
    (["--fail-on", "anomalous"], False, False),
    ([], False, False),
    ([], False, True),
    ([], True, True),
    (["--max-anomalous-fraction", "0.5"], False, True),
    (["--max-anomalous-fraction", "0.5"], True, True),
    (["--fail-on", "anomalous", "--batch-test"], False, False),
])
def test_junit_report_always_agrees_with_the_exit_code(runner, tmp_path, mixed_folder,
                                                       gate, skip, with_bad):
    inputs = [mixed_folder]
    if with_bad:
        (tmp_path / "bad.png").write_bytes(b"x")
        inputs.append(tmp_path / "bad.png")
    report = tmp_path / "r.xml"
    result = run(runner, "score", *inputs, "--model", MODEL, "--junit", report, "--format",
                 "json", *gate, *(["--skip-unreadable"] if skip else []))
    no_traceback(result)
    failures, errors, skipped = junit_counts(report)
    doc = json.loads(result.stdout)
    assert doc["summary"]["anomalous"] >= 3
    assert (failures + errors > 0) == (result.exit_code != 0), (result.exit_code, failures,
                                                                errors, result.stderr)
    assert doc["gate"]["exit_code"] == result.exit_code
    assert skipped == (1 if skip and with_bad else 0)
    if gate == ["--max-anomalous-fraction", "0.5"] and not with_bad:
        # 4 anomalous of 20 is within 0.5: the gate passes and no image is a failure
        assert result.exit_code == 0 and failures == 0


# ------------------------------------------------------------------------- bundles


def tampered(tmp_path: Path, file: str, change: Callable[[dict], None]) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(MODEL, bundle)
    doc = json.loads((bundle / file).read_text())
    change(doc)
    (bundle / file).write_text(json.dumps(doc))
    return bundle


def arch(field: str, value):
    return lambda doc: doc["architecture"].__setitem__(field, value)


def cal_entry(field: str, value):
    return lambda doc: doc["kinds"]["bpd"].__setitem__(field, value)


def delete(path: list[str]):
    def change(doc):
        for key in path[:-1]:
            doc = doc[key]
        del doc[path[-1]]
    return change


BUNDLE_CASES: dict[str, tuple[str, Callable[[dict], None], str]] = {
    "channels string": ("config.json", arch("channels", "1"), "channels: must be an integer"),
    "huge filters": ("config.json", arch("filters", 100_000), "filters: must be at most"),
    "parameter budget": ("config.json", lambda d: d["architecture"].update(
        filters=1024, layers=64), "parameters"),
    "negative layers": ("config.json", arch("layers", -1), "layers: must be at least 1"),
    "even kernel": ("config.json", arch("kernel", 4), "kernel: must be odd"),
    "levels 1": ("config.json", arch("levels", 1), "levels: must be at least 2"),
    "float height": ("config.json", arch("height", 8.5), "height: must be an integer"),
    "bool width": ("config.json", arch("width", True), "width: must be an integer"),
    "dropout string": ("config.json", arch("dropout", "x"), "dropout: must be a number"),
    "unknown architecture field": ("config.json", arch("colour", 1), "unknown field"),
    "architecture missing": ("config.json", delete(["architecture"]), "architecture: missing"),
    "architecture a list": ("config.json", lambda d: d.__setitem__("architecture", [1]),
                            "architecture: must be an object"),
    "background not an object": ("config.json", lambda d: d.__setitem__("background", 5),
                                 "background: must be an object"),
    "data a list": ("config.json", lambda d: d.__setitem__("data", [1]),
                    "data: must be an object"),
    "threshold NaN": ("calibration.json", cal_entry("threshold", float("nan")),
                      "threshold: must be a finite number"),
    "threshold null": ("calibration.json", cal_entry("threshold", None),
                       "threshold: must not be null"),
    "threshold missing": ("calibration.json", delete(["kinds", "bpd", "threshold"]),
                          "threshold: missing"),
    "threshold string": ("calibration.json", cal_entry("threshold", "2.2"),
                         "threshold: must be a number"),
    "fpr string": ("calibration.json", cal_entry("fpr", "0.05"), "fpr: must be a number"),
    "fpr 1.5": ("calibration.json", cal_entry("fpr", 1.5), "fpr: must be at most"),
    "n mismatch": ("calibration.json", cal_entry("n", 3), "but n is 3"),
    "scores with a string": ("calibration.json", cal_entry("scores", ["a"]),
                             "finite numbers only"),
    "scores with NaN": ("calibration.json", cal_entry("scores", [float("nan")]),
                        "finite numbers only"),
    "version 99": ("calibration.json", lambda d: d.__setitem__("version", 99),
                   "unsupported calibration.json version"),
    "kinds a list": ("calibration.json", lambda d: d.__setitem__("kinds", []),
                     "kinds: must be an object"),
    "default kind missing": ("calibration.json", lambda d: d.__setitem__("default_kind", "x"),
                             "default_kind 'x'"),
    "entry not an object": ("calibration.json", lambda d: d["kinds"].__setitem__("bpd", 3),
                            "must be a JSON object"),
}


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_tampered_bundle_is_a_one_line_error(case, runner, tmp_path, good_png):
    file, change, text = BUNDLE_CASES[case]
    bundle = tampered(tmp_path, file, change)
    result = run(runner, "score", good_png, "--model", bundle)
    no_traceback(result)
    assert result.exit_code == 2, result.stdout
    assert text in result.stderr and result.stderr.startswith("error:"), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("damage, text", [
    (lambda b: (b / "config.json").write_text("{not json"), "corrupt JSON"),
    (lambda b: (b / "config.json").write_text("[1, 2]"), "expected a JSON object"),
    (lambda b: (b / "model.safetensors").write_bytes(
        (b / "model.safetensors").read_bytes()[:1000]), "corrupt weights"),
    (lambda b: (b / "model.safetensors").unlink(), "missing model.safetensors"),
    (lambda b: (b / "calibration.json").write_bytes(b"\xff\xfe"), "corrupt JSON"),
])
def test_damaged_bundle_files(runner, tmp_path, good_png, damage, text):
    bundle = tmp_path / "bundle"
    shutil.copytree(MODEL, bundle)
    damage(bundle)
    result = run(runner, "score", good_png, "--model", bundle)
    no_traceback(result)
    assert result.exit_code == 2 and text in result.stderr, result.stderr


def test_nan_weights_give_error_rows_never_clean(runner, tmp_path, good_png):
    bundle = tmp_path / "bundle"
    shutil.copytree(MODEL, bundle)
    state = load_file(str(bundle / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    state[key] = state[key] * float("nan")
    save_file(state, str(bundle / "model.safetensors"))
    result = run(runner, "score", good_png, "digits:test[:3]", "--model", bundle,
                 "--format", "json")
    no_traceback(result)
    rows = json.loads(result.stdout)["results"]
    assert result.exit_code == 2
    assert all(r["verdict"] == "error" and "non-finite score" in r["error"] for r in rows)
    gated = run(runner, "score", good_png, "--model", bundle, "--fail-on", "anomalous",
                "--skip-unreadable", "--format", "csv")
    assert gated.exit_code == 1 and "non-finite score" in gated.stderr  # never skippable


# ------------------------------------------------------------ calibration and training


@pytest.fixture()
def bundle_copy(tmp_path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(MODEL, bundle)
    return bundle


def test_calibrating_on_too_few_images_is_an_error_with_the_number_needed(runner, bundle_copy):
    before = (bundle_copy / "calibration.json").read_bytes()
    result = run(runner, "calibrate", "--model", bundle_copy, "--data", "digits:calib[:20]",
                 "--fpr", "0.01")
    no_traceback(result)
    assert result.exit_code == 2
    assert "fpr=0.01 needs at least 99 clean calibration images, got 20" in result.stderr
    assert (bundle_copy / "calibration.json").read_bytes() == before


def test_conservative_threshold_is_explicit_printed_and_finite(runner, bundle_copy, good_png):
    result = run(runner, "calibrate", "--model", bundle_copy, "--data", "digits:calib[:20]",
                 "--fpr", "0.01", "--conservative-threshold")
    no_traceback(result)
    assert result.exit_code == 0 and "not guaranteed" in result.stderr
    entry = json.loads((bundle_copy / "calibration.json").read_text())["kinds"]["bpd"]
    assert entry["conservative"] is True and math.isfinite(entry["threshold"])
    assert entry["threshold"] == max(entry["scores"])
    scored = run(runner, "score", good_png, "--model", bundle_copy, "--format", "json")
    assert json.loads(scored.stdout)["threshold"] == entry["threshold"]


def test_calibrate_refuses_unreadable_files_unless_skipped(runner, bundle_copy, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    clean = load_images("digits:calib[:40]")
    for k in range(40):
        save_image(folder / f"{k:02d}.png", clean.images[k], 17)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "zz_big.png")
    result = run(runner, "calibrate", "--model", bundle_copy, "--data", folder)
    no_traceback(result)
    assert result.exit_code == 2 and "1 of 41 input files cannot be used" in result.stderr
    assert "--skip-unreadable" in result.stderr
    result = run(runner, "calibrate", "--model", bundle_copy, "--data", folder,
                 "--skip-unreadable")
    assert result.exit_code == 0 and "skipped" in result.stderr and "zz_big" in result.stderr


@pytest.mark.parametrize("spec, text", [
    ("digits:bogus", "digits has splits train, val, calib, test and all, not 'bogus'"),
    ("fashion-mnist:bogus", "fashion-mnist has splits train and test, not 'bogus'"),
    ("cifar10:bogus", "cifar10 has splits train and test"),
])
def test_train_on_an_unknown_split_lists_the_valid_ones(runner, tmp_path, spec, text):
    result = run(runner, "train", "--data", spec, "--out", tmp_path / "m", "--epochs", "1")
    no_traceback(result)
    assert result.exit_code == 2 and text in result.stderr, result.stderr
    assert not (tmp_path / "m").exists()


def test_train_on_an_explicit_non_train_split_uses_exactly_that_split():
    splits = training_splits("digits:test")
    names = [n for part in ("train", "val", "calib") for n in splits[part].names]
    assert len(names) == len(load_images("digits:test")) and len(set(names)) == len(names)
    assert all(n.startswith("digits:test:") for n in names)
    assert set(training_splits("digits")) == {"train", "val", "calib", "test"}


def test_train_refuses_mismatched_files_and_names_them(runner, tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    clean = load_images("digits:train[:30]")
    for k in range(30):
        save_image(folder / f"a{k:02d}.png", clean.images[k], 17)
    for k in range(3):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / f"b{k}.png")
    result = run(runner, "train", "--data", folder, "--out", tmp_path / "m", "--epochs", "1")
    no_traceback(result)
    assert result.exit_code == 2
    assert "3 of 33 input files cannot be used for training" in result.stderr
    assert "b0.png" in result.stderr and "--skip-unreadable" in result.stderr
    with pytest.raises(DataError, match="3 of 33"):
        training_splits(str(folder))
    skipped = training_splits(str(folder), skip_unreadable=True)
    assert len(skipped["train"].errors) == 3


def test_train_with_too_few_calibration_images_fails_before_training(runner, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    clean = load_images("digits:train[:30]")
    for k in range(30):
        save_image(folder / f"{k:02d}.png", clean.images[k], 17)
    result = run(runner, "train", "--data", folder, "--out", tmp_path / "m", "--epochs", "1")
    no_traceback(result)
    assert result.exit_code == 2 and "needs at least 19" in result.stderr
    assert "epoch" not in result.stderr  # refused before any training


# ------------------------------------------------------------------------ CLI misuse


@pytest.mark.parametrize("args, text", [
    (["--fail-on", "bogus"], "Invalid value for '--fail-on'"),
    (["--max-anomalous-fraction", "2"], "Invalid value for '--max-anomalous-fraction'"),
    (["--score", "bogus"], "Invalid value for '--score'"),
    (["--model", "/nonexistent/bundle"], "no such model bundle"),
])
def test_score_misuse_is_a_one_line_error(runner, good_png, args, text):
    result = run(runner, "score", good_png, *(["--model", MODEL] if "--model" not in args
                                               else []), *args)
    no_traceback(result)
    assert result.exit_code == 2 and text in result.stderr


@pytest.mark.parametrize("spec, text", [
    ("digits:nosuchsplit", "digits has splits"),
    ("digits:test[5:5]", "selects no images"),
])
def test_bad_data_specs_are_usage_errors(runner, spec, text):
    result = run(runner, "score", spec, "--model", MODEL)
    no_traceback(result)
    assert result.exit_code == 2 and text in result.stderr


@pytest.mark.parametrize("field, value, text", [
    ("channels", "1", "channels: must be an integer"),
    ("filters", 10**6, "filters: must be at most"),
    ("num_classes", 1, "num_classes: must be at least 2"),
    ("norm", "layer", "norm must be 'batch' or 'group'"),
])
def test_tampered_classifier_bundle_is_a_bundle_error(tmp_path, field, value, text):
    from pixeldefend.errors import BundleError
    from pixeldefend.models.classifier import load_classifier

    bundle = tmp_path / "classifier"
    shutil.copytree(REPO / "models" / "digits-classifier", bundle)
    doc = json.loads((bundle / "config.json").read_text())
    doc["architecture"][field] = value
    (bundle / "config.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=text):
        load_classifier(str(bundle), device="cpu")


def test_calibrate_replaces_an_invalid_calibration_json(runner, bundle_copy, good_png):
    doc = json.loads((bundle_copy / "calibration.json").read_text())
    doc["kinds"]["bpd"]["threshold"] = None  # what old versions wrote for "infinite"
    (bundle_copy / "calibration.json").write_text(json.dumps(doc))
    scored = run(runner, "score", good_png, "--model", bundle_copy)
    assert scored.exit_code == 2 and "run `pixeldefend calibrate`" in scored.stderr
    result = run(runner, "calibrate", "--model", bundle_copy)
    no_traceback(result)
    assert result.exit_code == 0 and "replacing the invalid calibration.json" in result.stderr
    assert run(runner, "score", good_png, "--model", bundle_copy).exit_code == 0
