"""Data-parallel training under torchrun (gloo on the CPU): the same model as one process,
rank 0 the only writer, --resume after a rank is killed and across world sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pixeldefend.cli import app
from pixeldefend.detector import DensityDetector
from pixeldefend.distributed import Dist
from pixeldefend.models.pixelcnn import PixelCNN, PixelCNNConfig
from pixeldefend.train import CRASH_ENV, TrainSettings, run_training

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--data", "digits", "--preset", "tiny", "--epochs", "3",
         "--batch-size", "64"]

# Records, per process, every file or folder it creates, renames, removes or opens for
# writing under AUDIT_ROOT (Python's audit hooks, PEP 578), in AUDIT_DIR/<RANK>.log.
AUDIT_SITECUSTOMIZE = textwrap.dedent('''
    import os, sys
    _root = os.environ.get("AUDIT_ROOT")
    if _root:
        _fd = os.open(os.path.join(os.environ["AUDIT_DIR"],
                                   os.environ.get("RANK", "launcher") + ".log"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        _writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                if not (isinstance(mode, str) and any(c in mode for c in "wax+")
                        or mode is None and isinstance(flags, int) and flags & _writes):
                    return
            elif event not in ("os.mkdir", "os.rename", "os.remove", "os.rmdir",
                               "shutil.rmtree"):
                return
            path = os.fsdecode(args[0]) if isinstance(args[0], (str, bytes)) else ""
            if path and os.path.abspath(path).startswith(_root):
                os.write(_fd, f"{event} {path}\\n".encode())

        sys.addaudithook(_hook)
''')


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    (tmp_path / "audit").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), PIXELDEFEND_THREADS="1",
               OMP_NUM_THREADS="1", AUDIT_ROOT=str(tmp_path / "runs"),
               AUDIT_DIR=str(tmp_path / "audit"), **extra)
    return env


def _torchrun(tmp_path: Path, args: list[str], ranks: int = 2,
              **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m pixeldefend ...` with this interpreter
    (--standalone: a rendezvous on a free local port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(ranks), "-m", "pixeldefend", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=600)


def _writes(tmp_path: Path, rank: str) -> list[str]:
    log = tmp_path / "audit" / f"{rank}.log"
    return log.read_text().splitlines() if log.exists() else []


def test_torchrun_training_matches_one_process_and_resumes_after_a_kill(tmp_path, runner):
    runs = tmp_path / "runs"
    one = runner.invoke(app, [*TRAIN, "--out", str(runs / "one")])
    assert one.exit_code == 0, one.output
    one_bpd = DensityDetector.load(runs / "one").meta["metrics"]["test_bits_per_dim"]

    # rank 1 dies (SIGKILL) right after the first epoch's checkpoint: the job fails
    out = runs / "two"
    killed = _torchrun(tmp_path, [*TRAIN, "--out", str(out)], **{CRASH_ENV: "1:0"})
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr
    checkpoint = json.loads((runs / "two.checkpoint" / "checkpoint.json").read_text())
    assert checkpoint["epoch"] == 0 and checkpoint["world"] == 2
    assert not out.exists()

    resumed = _torchrun(tmp_path, [*TRAIN, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch   2/3" in resumed.stderr and "epoch   1/3" not in resumed.stderr
    assert resumed.stdout.count("test bits/dim") == 1  # rank 0 alone reports
    detector = DensityDetector.load(out)  # a valid bundle, calibrated
    assert {"bpd", "dose"} <= set(detector.calibrations)
    two_bpd = detector.meta["metrics"]["test_bits_per_dim"]
    assert abs(two_bpd - one_bpd) < 0.03, (two_bpd, one_bpd)
    assert not (runs / "two.checkpoint").exists()
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "config.json",
                                                      "model.safetensors"]
    # rank 0 wrote the checkpoint and the bundle; rank 1 nothing, in either launch
    assert any("two.checkpoint" in w for w in _writes(tmp_path, "0"))
    assert any("calibration.json" in w for w in _writes(tmp_path, "0"))
    assert _writes(tmp_path, "1") == []


# -------------------------------------------------- the loop itself, in spawned ranks


def _tiny_problem(n: int = 101) -> tuple[PixelCNN, torch.Tensor]:
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig.from_preset("tiny", 1, 6, 6, 5))  # no dropout
    images = torch.randint(0, 5, (n, 1, 6, 6), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    return model, images


def _loss(m: torch.nn.Module, x: torch.Tensor, _y: object) -> torch.Tensor:
    return F.cross_entropy(m(x).float(), x.long())


def _val_sum(images: torch.Tensor):
    def evaluate(m: torch.nn.Module, block: range) -> tuple[float, int]:
        with torch.no_grad():
            x = images[block.start : block.stop]
            nll = F.cross_entropy(m(x), x.long(), reduction="none").flatten(1).mean(1)
        return float(nll.sum()), len(x)

    return evaluate


# 101 images in global batches of 34: the last batch of 33 splits 17/16, so an unweighted
# average of the ranks' mean gradients would not be the one-process step
SETTINGS = TrainSettings(epochs=2, batch_size=34, lr=1e-2, seed=0)


def test_each_rank_takes_a_block_weighted_by_its_share():
    from pixeldefend.train import _my_share

    batch = torch.arange(10, 13)
    first, w0 = _my_share(batch, Dist(0, 2))
    second, w1 = _my_share(batch, Dist(1, 2))
    assert first.tolist() == [10, 11] and second.tolist() == [12]
    assert (w0, w1) == (2 * 2 / 3, 1 * 2 / 3)  # DDP's average of the two: the batch mean
    # a rank left without images runs one, weighted 0 (it must join the all-reduce)
    alone, weight = _my_share(torch.tensor([7]), Dist(1, 2))
    assert alone.tolist() == [7] and weight == 0.0
    assert _my_share(batch, Dist()) == (batch, 1.0)


def _rank(rank: int, world: int, tmp: str) -> None:
    """Two epochs planned; rank 1 is killed right after the first epoch's checkpoint."""
    torch.set_num_threads(1)
    os.environ[CRASH_ENV] = "1:0"
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store",
                                         rank=rank, world_size=world)
    try:
        model, images = _tiny_problem()
        run_training(model, _loss, images, None, _val_sum(images[:30]), SETTINGS,
                     torch.device("cpu"), checkpoint_dir=Path(tmp) / f"ckpt{rank}",
                     val_size=30, dist=Dist(rank, world, rank, torch.device("cpu")))
    finally:
        torch.distributed.destroy_process_group()


def _one_process(epochs: int, checkpoint: Path | None = None, resume: bool = False):
    model, images = _tiny_problem()
    settings = TrainSettings(**{**SETTINGS.__dict__, "epochs": epochs})
    result = run_training(model, _loss, images, None, _val_sum(images[:30]), settings,
                          torch.device("cpu"), checkpoint_dir=checkpoint, resume=resume,
                          val_size=30, dist=Dist())
    return model.state_dict(), result.history


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory):
    """Epoch 0 of two on two spawned gloo ranks; then rank 1 dies and the job fails."""
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp")
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        mp.start_processes(_rank, args=(2, str(tmp)), nprocs=2, join=True,
                           start_method="spawn")
    assert not (tmp / "ckpt1").exists()  # only rank 0 writes checkpoints
    return tmp / "ckpt0"


def test_two_ranks_take_exactly_the_one_process_steps(two_rank_checkpoint):
    from safetensors.torch import load_file

    meta = json.loads((two_rank_checkpoint / "checkpoint.json").read_text())
    tensors = load_file(str(two_rank_checkpoint / "checkpoint.safetensors"))
    assert meta["epoch"] == 0 and meta["world"] == 2
    state, history = _one_process(1)
    # float32 sums in another order, which Adam amplifies where a gradient is near 0:
    # measured up to 3e-5; weighting the ranks' blocks equally instead: 4e-3
    for key, value in state.items():
        assert torch.allclose(tensors[f"model.{key}"], value, atol=3e-4), key
    # training loss and validation metric: sums over ranks, the one-process values
    assert meta["history"][0]["val"] == pytest.approx(history[0]["val"], abs=1e-6)
    assert meta["history"][0]["train"] == pytest.approx(history[0]["train"], abs=1e-6)


def test_a_two_rank_checkpoint_resumes_in_one_process(two_rank_checkpoint):
    resumed, history = _one_process(2, two_rank_checkpoint, resume=True)
    straight, _ = _one_process(2)
    assert [h["epoch"] for h in history] == [0, 1]
    for key, value in straight.items():
        assert torch.allclose(resumed[key], value, atol=3e-4), key


# ------------------------------------------------------------------------------ bench


def test_bench_reports_training_throughput_per_number_of_ranks():
    from pixeldefend.bench import ScalingSettings, parse_ranks, training_scaling
    from pixeldefend.rendering import scaling_notes

    doc = training_scaling(ScalingSettings(ranks=(1, 2), batch_size=8, steps=2, warmup=1,
                                           preset="tiny", shape=(1, 8, 8), levels=17))
    assert doc["backend"] == "gloo" and [r["ranks"] for r in doc["rows"]] == [1, 2]
    one, two = doc["rows"]
    assert one["efficiency"] == 1.0 and one["images_per_s"] > 0
    # no timing asserts: only that the figures are consistent with each other
    assert two["efficiency"] == pytest.approx(two["images_per_s"] / (2 * one["images_per_s"]))
    assert two["images_per_s"] == pytest.approx(2 * 8 / (two["step_s"] * 2))
    lines = scaling_notes({"training_scaling": doc})
    assert "2 rank(s):" in lines[-1] and "scaling efficiency" in lines[-1]
    assert parse_ranks("1,2, 4") == (1, 2, 4) and parse_ranks("") == ()


def test_ranks_on_one_machine_share_its_cores(monkeypatch):
    from pixeldefend.threads import default_threads

    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = default_threads().threads
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads().threads == max(1, alone // 2)


def test_batch_norm_is_synchronised_only_where_torch_can():
    from pixeldefend.models.classifier import ClassifierConfig, ResNetClassifier
    from pixeldefend.train import wants_sync_batchnorm

    shape = {"channels": 1, "height": 8, "width": 8, "num_classes": 10, "levels": 17}
    batch = ResNetClassifier(ClassifierConfig(**shape))
    group = ResNetClassifier(ClassifierConfig(**shape, norm="group"))
    assert wants_sync_batchnorm(batch, torch.device("cuda"))
    assert not wants_sync_batchnorm(batch, torch.device("cpu"))  # gloo: SyncBatchNorm can't
    assert not wants_sync_batchnorm(group, torch.device("cuda"))
    assert not wants_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3)),
                                    torch.device("cuda"))  # could not be turned back


def test_sync_batch_norm_turns_back_into_the_same_plain_model():
    from pixeldefend.models.classifier import ClassifierConfig, ResNetClassifier
    from pixeldefend.train import plain_batchnorm

    torch.manual_seed(0)
    model = ResNetClassifier(ClassifierConfig(channels=1, height=8, width=8, num_classes=10,
                                              levels=17))
    x = torch.randn(4, 1, 8, 8)
    model.train()
    model(x)  # move the running statistics away from their initial values
    model.eval()
    keys, want = list(model.state_dict()), model(x)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    plain = plain_batchnorm(synced)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain.modules())
    assert list(plain.state_dict()) == keys
    assert torch.equal(plain(x), want)
