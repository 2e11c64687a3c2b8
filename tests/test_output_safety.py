"""Outputs never destroy what the user owns (issue 10, items 1-3): no command deletes or
overwrites a file or folder pixeldefend did not create, or one of its own inputs;
atomic writes keep symlinks, special files and permissions; the bundle swap always
leaves a complete bundle, also under kill -9 and concurrent writers; code-running
classifiers need --trust-code. Every refusal is exit 2, before any slow work."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pixeldefend.atomic import atomic_dir, atomic_path, write_json, write_text
from pixeldefend.bundle import read_calibration, read_config, read_weights, save_bundle
from pixeldefend.cli import app
from pixeldefend.data import load_images, save_image
from pixeldefend.outputs import MARKER, OutputError, check_file, prepare_dir
from pixeldefend.training_pipeline import default_out

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


@pytest.fixture()
def model(repo) -> Path:
    return repo / "models" / "digits"


@pytest.fixture()
def pngs(tmp_path) -> Path:
    """A folder of 12 digit PNGs: a user's training data."""
    folder = tmp_path / "pngs"
    images = load_images("digits:test[:12]")
    for k in range(12):
        save_image(folder / f"d{k}.png", images.images[k], 17)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


# ------------------------------------------------------------------ atomic file writes


def test_write_follows_a_symlink_and_keeps_it(tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to("real.csv")  # relative link
    write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == "real.csv"
    assert real.read_text() == "new"
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "sub" / "target.csv")
    write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "sub" / "target.csv").read_text() == "made"


def test_write_keeps_permission_bits(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    secret.chmod(0o600)
    write_json(secret, {"a": 1})
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert json.loads(secret.read_text()) == {"a": 1}
    fresh = tmp_path / "fresh.json"
    write_json(fresh, {})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_write_goes_through_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    with atomic_path(fifo) as path:
        assert path == fifo.resolve()  # a special file is written in place
        path.write_bytes(b"rows\n")
    reader.join(timeout=30)
    assert got == [b"rows\n"] and stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


@pytest.fixture()
def null_device(tmp_path) -> Path:
    """A private copy of /dev/null (character device 1:3), so a broken implementation
    replaces this node, never the system's own /dev/null."""
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (AttributeError, OSError):
        pytest.skip("cannot create a device node here (needs root / CAP_MKNOD)")
    return node


def test_write_to_a_device_keeps_the_device(null_device):
    write_text(null_device, "discarded")
    assert stat.S_ISCHR(os.stat(null_device).st_mode)


def test_cli_output_to_a_device_and_a_symlink(tmp_path, model, repo, null_device):
    samples = repo / "data" / "samples" / "clean"
    result = run("score", samples, "--model", model, "--format", "csv", "-o", null_device)
    assert result.exit_code == 0, result.output
    assert stat.S_ISCHR(os.stat(null_device).st_mode)
    real = tmp_path / "scores.csv"
    real.write_text("")
    real.chmod(0o640)
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    result = run("score", samples, "--model", model, "--format", "csv", "-o", link,
                 "--overwrite")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and real.read_text().startswith("path,")
    assert stat.S_ISREG(real.stat().st_mode) and stat.S_IMODE(real.stat().st_mode) == 0o640


# -------------------------------------------------------------------- bundle swap


def _save_generation(path: Path, generation: int) -> None:
    """A bundle whose weights, config and calibration all name the same generation, with
    a shape that changes between generations (a mixed bundle would be caught)."""
    rows = 1 + generation % 5
    save_bundle(path, "test", {"rows": rows},
                {"w": torch.full((rows, 64), float(generation))},
                meta={"generation": generation}, calibration={"generation": generation})


def _assert_complete(path: Path) -> int:
    config = read_config(path)
    weights = read_weights(path)["w"]
    assert weights.shape[0] == config["architecture"]["rows"]
    assert bool((weights == config["generation"]).all())
    assert read_calibration(path)["generation"] == config["generation"]
    return int(config["generation"])


def test_bundle_save_replaces_a_plain_directory_bundle_in_place(tmp_path, model):
    import shutil

    copy = tmp_path / "digits"
    shutil.copytree(model, copy)  # a shipped bundle: a plain directory
    inode = copy.stat().st_ino
    _save_generation(copy, 3)
    assert copy.is_dir() and not copy.is_symlink() and copy.stat().st_ino != inode
    assert _assert_complete(copy) == 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".digits.")]
    assert leftovers == [".digits.lock"]


def test_stale_temporary_directories_are_removed_on_the_next_save(tmp_path):
    bundle = tmp_path / "b"
    (tmp_path / ".b.tmp-dead1234").mkdir()
    (tmp_path / ".b.tmp-dead1234" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".b.old-99999").mkdir()
    _save_generation(bundle, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.lock", "b"]


@needs_fork
def test_kill_9_during_bundle_saves_always_leaves_a_complete_bundle(tmp_path):
    """A child saves bundles in a tight loop and is SIGKILLed at seeded random moments;
    after every kill the path is a complete, consistent bundle; the next save cleans up."""
    bundle = tmp_path / "bundle"
    _save_generation(bundle, 0)
    rng = random.Random(1234)
    generation = 1
    for _ in range(20):
        start = generation
        pid = os.fork()
        if pid == 0:  # child: save until killed
            try:
                g = start
                while True:
                    _save_generation(bundle, g)
                    g += 1
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert bundle.is_dir()
        _assert_complete(bundle)
        generation += 1000
    _save_generation(bundle, generation)
    assert _assert_complete(bundle) == generation
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle"]


@needs_fork
def test_concurrent_saves_all_succeed_and_the_path_never_disappears(tmp_path):
    bundle = tmp_path / "bundle"
    _save_generation(bundle, 0)
    pids = []
    for worker in range(4):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for k in range(25):
                    _save_generation(bundle, 1 + worker * 100 + k)
            except BaseException:  # noqa: BLE001 - report any failure as the exit code
                code = 3
            os._exit(code)
        pids.append(pid)
    missing = 0
    alive = set(pids)
    codes = []
    while alive:
        missing += not bundle.is_dir()
        for pid in list(alive):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                alive.discard(pid)
                codes.append(os.waitstatus_to_exitcode(status))
    assert codes == [0, 0, 0, 0]
    assert missing == 0
    _assert_complete(bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle"]


def test_atomic_dir_refuses_to_replace_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("mine")
    with pytest.raises(NotADirectoryError), atomic_dir(target, replaceable=lambda _: True) as tmp:
        (tmp / "x").write_text("x")
    assert target.read_text() == "mine"


def test_atomic_dir_never_swaps_away_a_folder_its_caller_does_not_own(tmp_path):
    """The guard sits in the swap itself, so the Python API (write_attack_output,
    save_bundle, checkpoints) cannot delete a user's folder either."""
    from pixeldefend.atomic import NotOursError, only_entries

    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    lookalike = tmp_path / ".mine.tmp-backup"  # not a name atomic_dir makes: not a leftover
    lookalike.mkdir()
    with pytest.raises(NotOursError), atomic_dir(
            target, replaceable=only_entries(frozenset({"model.safetensors"}))) as tmp:
        (tmp / "model.safetensors").write_text("x")
    assert (target / "notes.txt").read_text() == "keep" and lookalike.is_dir()
    with atomic_dir(target, replaceable=lambda _: True) as tmp:  # the caller's decision
        (tmp / "model.safetensors").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert lookalike.is_dir()


def test_write_attack_output_refuses_an_unmarked_folder(tmp_path):
    from pixeldefend.atomic import NotOursError
    from pixeldefend.attack_pipeline import write_attack_output

    out = tmp_path / "adv"
    out.mkdir()
    (out / "photo.png").write_bytes(b"mine")
    with pytest.raises(NotOursError):
        write_attack_output(out, None, None, {"images": []})  # type: ignore[arg-type]
    assert (out / "photo.png").read_bytes() == b"mine"


# ----------------------------------------------------------- output planning (library)


def test_prepare_dir_rules(tmp_path, pngs, model):
    assert not prepare_dir(tmp_path / "new", command="t").existing
    (tmp_path / "empty").mkdir()
    assert not prepare_dir(tmp_path / "empty", command="t").existing
    with pytest.raises(OutputError, match="is an input"):
        prepare_dir(pngs, command="t", inputs=[pngs], overwrite=True)
    with pytest.raises(OutputError, match="contains an input"):
        prepare_dir(tmp_path, command="t", inputs=[pngs], overwrite=True)
    with pytest.raises(OutputError, match="did not create"):
        prepare_dir(pngs, command="t", overwrite=True)
    ours = tmp_path / "ours"
    prepare_dir(ours, command="t").mark()
    (ours / "result.json").write_text("{}")
    with pytest.raises(OutputError, match="overwrite=True"):
        prepare_dir(ours, command="t")
    with pytest.raises(OutputError, match="resume=True"):
        prepare_dir(ours, command="t", can_resume=True)
    assert prepare_dir(ours, command="t", resume=True, can_resume=True).existing
    assert prepare_dir(ours, command="t", overwrite=True).existing
    # a bundle is ours, but only as a bundle, and only holding bundle files
    with pytest.raises(OutputError, match="did not create"):
        prepare_dir(model, command="attack", overwrite=True)
    assert prepare_dir(model, command="train", overwrite=True, bundle=True).existing
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        prepare_dir(tmp_path / "file", command="t")
    with pytest.raises(OutputError, match="not a folder"):
        prepare_dir(tmp_path / "file" / "sub", command="t")


def test_check_file_rules(tmp_path, pngs, model):
    assert check_file(tmp_path / "new.json") is not None
    with pytest.raises(OutputError, match="input"):
        check_file(pngs / "d0.png", inputs=[pngs / "d0.png"], overwrite=True)
    with pytest.raises(OutputError, match="input"):
        check_file(model / "config.json", inputs=[model.resolve()], overwrite=True)
    with pytest.raises(OutputError, match="overwrite=True"):
        check_file(pngs / "d0.png")
    assert check_file(pngs / "d0.png", overwrite=True) is not None
    with pytest.raises(OutputError, match="is a folder"):
        check_file(pngs, overwrite=True)
    with pytest.raises(OutputError, match="not a folder"):
        check_file(pngs / "d0.png" / "x.csv")
    assert check_file(Path("/dev/null")) is not None  # only checked, never written


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write into read-only folders")
def test_unwritable_output_folder_is_refused_up_front(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="permission"):
            check_file(locked / "out.csv")
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------ commands (CLI)


def test_train_out_never_deletes_a_users_folder(tmp_path):
    folder = tmp_path / "u"
    folder.mkdir()
    (folder / "keep").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = run("train", "--out", folder, "--epochs", "1", "--preset", "tiny", *extra)
        assert_refused(result, "did not create", "--overwrite")
        assert (folder / "keep").read_text() == "mine"


def test_train_onto_its_own_data_is_refused(pngs, tmp_path):
    before = snapshot(pngs)
    for out in (pngs, tmp_path):
        result = run("train", "--data", pngs, "--out", out, "--overwrite", "--epochs", "1",
                     "--preset", "tiny")
        assert_refused(result, "input")
    assert snapshot(pngs) == before


def test_retraining_into_a_bundle_needs_overwrite(tmp_path, model):
    import shutil

    bundle = tmp_path / "digits"
    shutil.copytree(model, bundle)
    before = snapshot(bundle)
    args = ["train", "--out", bundle, "--preset", "tiny", "--epochs", "1", "--max-images",
            "64", "--batch-size", "64", "--device", "cpu"]
    assert_refused(run(*args), "already holds a model bundle", "--overwrite")
    assert snapshot(bundle) == before
    (bundle / "notes.txt").write_text("mine")
    assert_refused(run(*args, "--overwrite"), "notes.txt")
    (bundle / "notes.txt").unlink()
    result = run(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_config(bundle)["architecture"] != json.loads(before["config.json"])[
        "architecture"]


def test_classifier_train_refuses_a_foreign_folder(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert_refused(run("classifier", "train", "--out", folder, "--overwrite", "--epochs", "1"),
                   "did not create")
    assert (folder / "keep.txt").read_text() == "mine"


def test_attack_never_wipes_a_folder_that_merely_holds_a_manifest(tmp_path, repo):
    folder = tmp_path / "adv"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    (folder / "thesis.pdf").write_text("years of work")
    clf = repo / "models" / "digits-classifier"
    for extra in ([], ["--overwrite"]):
        result = run("attack", "-c", clf, "-n", "2", "--method", "fgsm", "--out", folder,
                     *extra)
        assert_refused(result, "did not create")
    assert (folder / "thesis.pdf").read_text() == "years of work"


def test_purify_onto_its_input_folder_is_refused(pngs, model):
    before = snapshot(pngs)
    result = run("purify", pngs, "--model", model, "--out", pngs, "--overwrite")
    assert_refused(result, "input")
    assert snapshot(pngs) == before


def test_purify_rerun_needs_overwrite_and_then_replaces_its_own_output(pngs, model,
                                                                       tmp_path):
    out = tmp_path / "pur"
    first = run("purify", pngs / "d0.png", pngs / "d1.png", "--model", model, "--out", out)
    assert first.exit_code == 0, first.output
    assert (out / MARKER).is_file() and (out / "d1.png").is_file()
    assert_refused(run("purify", pngs / "d0.png", "--model", model, "--out", out),
                   "--overwrite")
    again = run("purify", pngs / "d0.png", "--model", model, "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert not (out / "d1.png").exists()  # the earlier run's copies are gone, not mixed


def test_score_outputs_never_replace_inputs_or_existing_files(pngs, model, tmp_path):
    before = snapshot(pngs)
    config = (model / "config.json").read_bytes()
    assert_refused(run("score", pngs, "--model", model, "-o", pngs / "d0.png", "--overwrite"),
                   "input")
    assert_refused(run("score", pngs, "--model", model, "--junit", model / "config.json",
                       "--overwrite"), "input")
    assert_refused(run("score", pngs, "--model", model, "-o", pngs), "input")
    assert_refused(run("score", pngs, "--model", model, "-o", tmp_path), "is a folder")
    existing = tmp_path / "report.csv"
    existing.write_text("keep")
    assert_refused(run("score", pngs, "--model", model, "-o", existing), "--overwrite")
    assert_refused(run("score", pngs, "--model", model, "-o", existing / "x.csv"),
                   "not a folder")
    assert existing.read_text() == "keep"
    assert snapshot(pngs) == before and (model / "config.json").read_bytes() == config
    ok = run("score", pngs, "--model", model, "--format", "csv", "-o", existing, "--overwrite")
    assert ok.exit_code == 0 and existing.read_text().startswith("path,")


def test_heatmap_folder_must_be_new_empty_or_ours(pngs, model, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"x")
    assert_refused(run("score", pngs, "--model", model, "--heatmap", foreign, "--overwrite"),
                   "did not create")
    assert (foreign / "a.jpg").read_bytes() == b"x"


def test_evaluate_out_is_replaced_only_with_overwrite_and_continued_with_resume(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    write_json(out / MARKER, {"created_by": "pixeldefend", "command": "evaluate"})
    (out / "results.json").write_text('{"finished": true}')
    result = run("evaluate", "-n", "2", "-o", out)
    assert_refused(result, "--overwrite", "--resume")
    assert (out / "results.json").read_text() == '{"finished": true}'


def test_sample_bench_and_ood_outputs_are_checked_first(tmp_path, model):
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"my drawing")
    assert_refused(run("sample", "--model", model, "-n", "1", "--out", grid), "--overwrite")
    assert grid.read_bytes() == b"my drawing"
    assert_refused(run("bench", "--model", model, "-o", model / "config.json", "--overwrite"),
                   "input")
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "paper.md").write_text("mine")
    assert_refused(run("evaluate-ood", "--model", model, "--out", foreign, "--overwrite"),
                   "did not create")


def test_bare_train_writes_an_untracked_folder():
    assert default_out("digits") == Path("runs/digits")
    assert default_out("fashion-mnist:train") == Path("runs/fashion-mnist")


# ------------------------------------------------------------------- trust boundary


def test_code_running_classifiers_need_trust_code(tmp_path, model):
    script = tmp_path / "model.pt"
    script.write_bytes(b"whatever: refused before it is opened")
    for spec in (str(script), "os.path:join"):
        assert_refused(run("attack", "-c", spec, "--data", "digits:test", "-n", "2"),
                       "--trust-code")
        assert_refused(run("defend", "digits:test[:2]", "-c", spec, "--model", model),
                       "--trust-code")
        assert_refused(run("evaluate", "-c", spec, "-n", "2", "-o", tmp_path / "e"),
                       "--trust-code")
    trusted = run("attack", "-c", str(script), "--data", "digits:test", "-n", "2",
                  "--trust-code")
    assert trusted.exit_code == 2 and "not a TorchScript file" in trusted.output
    for command in ("attack", "defend", "evaluate"):
        assert "--trust-code" in run(command, "--help").output


# ------------------------------------------------------------------- default threads


def test_default_threads_leave_busy_cores_alone(tmp_path):
    from pixeldefend.threads import cgroup_cpu_limit, choose_threads, default_threads

    assert choose_threads(2, 0.1, 2) == 2  # idle 2-core machine: both cores
    assert choose_threads(2, 1.2, 2) == 1  # one core busy elsewhere
    assert choose_threads(2, 6.0, 2) == 1  # never below one
    assert choose_threads(4, 3.0, 16) == 4  # the rest of a big machine absorbs the load
    assert choose_threads(64, None, 64) == 8  # capped
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    choice = default_threads()
    assert 1 <= choice.threads <= choice.cores and "thread" in choice.describe()


def test_library_save_and_checkpoints_never_replace_foreign_folders(tmp_path, model):
    import shutil

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not create"):
        _save_generation(folder, 1)
    assert (folder / "keep.txt").read_text() == "mine"
    bundle = tmp_path / "digits"
    shutil.copytree(model, bundle)
    (bundle / "notes.txt").write_text("mine")
    assert_refused(run("train-background", "--model", bundle, "--epochs", "1"), "notes.txt")
    checkpoint = tmp_path / "out.checkpoint"
    checkpoint.mkdir()
    (checkpoint / "keep.txt").write_text("mine")
    assert_refused(run("train", "--out", tmp_path / "out", "--epochs", "1"), "checkpoint")
    assert (checkpoint / "keep.txt").read_text() == "mine"
