"""`pixeldefend bench`: throughput on the user's own hardware.

Per case (a PixelCNN, a batch of images, an eps_defend) it times one scoring forward
pass (bits/dim), one training step, fast purification (with the time split over the
decoder's phases) and the reference purification. The reference costs one full
float64 forward pass per sub-pixel, so for large images it is timed on its first few
sub-pixels and extrapolated linearly (every step is the same full pass, so the
extrapolation is honest); the result says which figures are extrapolated.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .defaults import CASE_NAMES as CASE_NAMES
from .defaults import DEFAULT_MODEL as DEFAULT_MODEL
from .density import bits_per_dim
from .errors import UsageError
from .models.pixelcnn import PixelCNN, PixelCNNConfig
from .purify import (
    default_eps_defend,
    float64_copy,
    purify_fast,
    purify_reference,
    purify_single_pass,
    reference_steps,
)
from .roofline import best_time, matmul_gflops, plain_path_times, roofline
from .threads import default_threads
from .train import backward_in_parts


@dataclass
class BenchCase:
    name: str
    model: PixelCNN
    images: torch.Tensor  # uint8 (N, C, H, W)
    eps: int
    note: str = ""


@dataclass
class BenchSettings:
    batch_size: int = 64
    quick: bool = False
    # seconds of reference steps per case before extrapolating; None: 4 with quick, else
    # 20; 0: no budget, the reference always runs in full (results independent of load)
    reference_budget: float | None = None
    threads: int | None = None
    train_step: bool = True
    cases: tuple[str, ...] = CASE_NAMES
    model: Path = DEFAULT_MODEL
    seed: int = 0
    profile: bool = False  # also profile fast purification per operator (torch.profiler)

    def budget(self) -> float:
        """Seconds of reference purification per case; 0 means no budget."""
        if self.reference_budget is not None:
            return self.reference_budget
        return 4.0 if self.quick else 20.0


def _random_case(name: str, shape: tuple[int, int, int], levels: int, n: int, eps: int,
                 seed: int, note: str) -> BenchCase:
    torch.manual_seed(seed)
    model = PixelCNN(PixelCNNConfig.from_preset("small", *shape, levels)).eval()
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, levels, (n, *shape), generator=g, dtype=torch.uint8)
    return BenchCase(name, model, images, eps, note)


def make_cases(settings: BenchSettings) -> list[BenchCase]:
    """The shipped digits model (or a stand-in) and the `small` preset at 28x28x1 and
    32x32x3 with 256 levels (random weights: the cost does not depend on them)."""
    n = settings.batch_size
    out = []
    for name in settings.cases:
        if name == "digits":
            path = settings.model
            if (path / "config.json").exists():
                from .data import load_images
                from .detector import DensityDetector

                det = DensityDetector.load(path, device="cpu")
                data = load_images("digits:all", det.spec)
                images = data.images[:n]
                if images.shape[0] < n:
                    images = images.repeat((n + images.shape[0] - 1) // images.shape[0],
                                           1, 1, 1)[:n]
                out.append(BenchCase("digits", det.model.eval(), images,
                                     default_eps_defend(det.spec.levels), f"model {path}"))
            else:
                out.append(_random_case("digits", (1, 8, 8), 17, n, 1, settings.seed,
                                        f"{path} not found: small preset, random weights"))
        elif name == "28x28x1":
            out.append(_random_case(name, (1, 28, 28), 256, n, 16, settings.seed,
                                    "small preset, random weights"))
        elif name == "32x32x3":
            out.append(_random_case(name, (3, 32, 32), 256, n, 16, settings.seed,
                                    "small preset, random weights"))
        else:
            raise ValueError(f"unknown bench case {name!r}: choose from {', '.join(CASE_NAMES)}")
    return out


SCORING_REPEAT = 5


def _train_step_time(model: PixelCNN, images: torch.Tensor, repeat: int) -> float:
    """One Adam step (forward, loss, backward, update) on a copy of the model, as
    `train` runs it."""
    import copy

    m = copy.deepcopy(model).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        backward_in_parts(m, lambda model, x, _y: model.nll(x).mean(), images, None,
                          m.images_per_pass())
        opt.step()

    step()  # warm-up: allocates the optimiser state
    return best_time(step, repeat)


def peak_memory_mb(device: torch.device | None = None) -> float | None:
    """Peak memory so far: CUDA's allocator peak on a GPU, else the process's peak RSS.

    The RSS peak only grows, so with the cases run from small to large it is each case's
    own peak (the largest case dominates)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if platform.system() == "Darwin" else rss / 2**10  # bytes vs KiB


def run_case(case: BenchCase, settings: BenchSettings,
             log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    model, images, eps = case.model, case.images, case.eps
    n, c, h, w = images.shape
    steps_total = c * h * w
    repeat = 1 if settings.quick else 2
    with torch.inference_mode():
        model(images[:2])  # warm-up
    log(f"{case.name}: matmul rate")
    matmul = matmul_gflops(repeat=SCORING_REPEAT)
    log(f"{case.name}: scoring pass")
    # one scoring pass takes milliseconds, so one sample is mostly noise on a busy machine:
    # best of a few, the same number for both lines so their ratio is fair
    scoring_repeat = max(repeat, SCORING_REPEAT)
    score_s = best_time(lambda: bits_per_dim(model, images, batch_size=n), scoring_repeat)
    log(f"{case.name}: dose scoring")
    dose_s = best_time(_dose_scorer(model, images), scoring_repeat)
    train_s = None
    if settings.train_step:
        log(f"{case.name}: training step")
        train_s = _train_step_time(model, images, 1)
    log(f"{case.name}: fast purification, single-pass approximation, scoring (interleaved)")
    costs = _purification_costs(model, images, eps, scoring_repeat, score_s)
    fast_s, fast_out = costs.pop("fast_s"), costs.pop("fast_out")
    stats, timings = costs.pop("stats"), costs.pop("timings")
    top_ops = _profile_fast(model, images, eps) if settings.profile else None
    log(f"{case.name}: reference purification")
    budget = settings.budget()
    model64 = float64_copy(model)
    orig = images.long()
    x = orig.clone()
    done = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in reference_steps(model64, x, orig, eps):
            done += 1
            if budget and time.perf_counter() - start > budget and done < steps_total:
                break
    ref_elapsed = time.perf_counter() - start
    extrapolated = done < steps_total
    ref_s = ref_elapsed / done * steps_total
    identical = None
    if not extrapolated:
        identical = bool(torch.equal(x.to(torch.uint8), fast_out))
        if not identical:  # never expected; recheck through the public function to be sure
            identical = bool(torch.equal(purify_reference(model, images, eps, n), fast_out))
    total_phase = sum(timings.values()) or 1.0
    return {
        "case": case.name, "note": case.note,
        "shape": [c, h, w], "levels": model.config.levels, "batch": n, "eps_defend": eps,
        "score_s": score_s, "score_images_per_s": n / score_s,
        "dose_s": dose_s, "dose_images_per_s": n / dose_s, "dose_over_score": dose_s / score_s,
        "train_step_s": train_s,
        "fast_s": fast_s, "fast_images_per_s": n / fast_s,
        "reference_s": ref_s, "reference_images_per_s": n / ref_s,
        "reference_extrapolated": extrapolated, "reference_steps_timed": done,
        "reference_steps_total": steps_total,
        "speedup_fast_vs_reference": ref_s / fast_s,
        "fast_split": {k: v / total_phase for k, v in timings.items()},
        "fallbacks": int(stats.get("fallbacks", 0)),
        "approx_images_per_s": n / costs["approx_s"], **costs,
        "identical": identical,
        "fast_top_ops": top_ops,
        "peak_memory_mb": peak_memory_mb(images.device),
        **roofline(model, images, matmul, score_s, train_s, fast_s),
        **_speedup_vs_plain(model, images, scoring_repeat, score_s, train_s),
    }


def _purification_costs(model: PixelCNN, images: torch.Tensor, eps: int, repeat: int,
                        score_s: float) -> dict[str, Any]:
    """Exact (fast) purification against one scoring pass and against the one-pass
    approximation (`purify_single_pass`, IBM ART's inexact PixelDefend), timed in
    interleaved rounds (scoring, approximation, exact) and best of `repeat` each, so a
    machine whose load drifts during the run slows all three alike. `score_s` (timed
    earlier) counts too: the ratios use the fastest scoring pass seen. Also: the phase
    timings and stats of the best exact run, and the share of sub-pixels the
    approximation gets wrong (it is not PixelDefend)."""
    n = images.shape[0]
    best: dict[str, Any] = {"score": score_s, "approx": float("inf"), "fast": float("inf")}
    for _ in range(max(1, repeat)):
        best["score"] = min(best["score"], best_time(
            lambda: bits_per_dim(model, images, batch_size=n), 1))
        best["approx"] = min(best["approx"], best_time(
            lambda: purify_single_pass(model, images, eps, batch_size=n), 1))
        timings: dict[str, float] = {}
        stats: dict[str, Any] = {}
        start = time.perf_counter()
        out = purify_fast(model, images, eps, batch_size=n, stats=stats, timings=timings)
        elapsed = time.perf_counter() - start
        if elapsed < best["fast"]:
            best.update(fast=elapsed, out=out, stats=stats, timings=timings)
    approx_out = purify_single_pass(model, images, eps, batch_size=n)
    return {
        "fast_s": best["fast"], "fast_out": best["out"], "stats": best["stats"],
        "timings": best["timings"], "approx_s": best["approx"], "score_best_s": best["score"],
        "fast_over_score": best["fast"] / best["score"],
        "approx_over_score": best["approx"] / best["score"],
        "fast_over_approx": best["fast"] / best["approx"],
        "approx_mismatch": float((approx_out != best["out"]).double().mean()),
    }


def _speedup_vs_plain(model: PixelCNN, images: torch.Tensor, repeat: int, score_s: float,
                      train_s: float | None) -> dict[str, float | None]:
    """The plain NCHW forward path timed in the same run, and the fast path's speed-up."""
    plain = plain_path_times(model, images, repeat, train_s is not None)
    train_plain = plain["train_step_plain_s"]
    return {**plain, "score_speedup_vs_plain": plain["score_plain_s"] / score_s,
            "train_speedup_vs_plain": None if train_plain is None or train_s is None
            else train_plain / train_s}


def _dose_scorer(model: PixelCNN, images: torch.Tensor) -> Callable[[], Any]:
    """What the default `dose` score costs per batch: one model pass with entropies and
    feature norms, the lossless codec, the statistics and the density. The density is
    fitted on the batch itself (only its cost matters here, not its values)."""
    from .dose import DoseModel
    from .scores import DEFAULT_CODEC, codec_bits_per_dim
    from .statistics import model_pass

    n = images.shape[0]
    levels = model.config.levels
    dose = DoseModel.fit(model_pass(model, images, n), codec_bits_per_dim(images, levels,
                                                                          DEFAULT_CODEC))

    def run() -> Any:
        result = model_pass(model, images, n)
        return dose.score(dose.features(result, codec_bits_per_dim(images, levels,
                                                                   DEFAULT_CODEC)))

    return run


def _profile_fast(model: PixelCNN, images: torch.Tensor, eps: int,
                  top: int = 8) -> list[dict[str, Any]]:
    """Share of fast purification's CPU time per torch operator (a separate run: the
    profiler's own overhead must not pollute the timed one)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        purify_fast(model, images, eps, batch_size=images.shape[0])
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count}
            for e in events[:top]]


def system_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "threads_default": default_threads().describe(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "load_average_1m": None if load is None else load[0],
    }


def run_bench(settings: BenchSettings,
              log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run every case; returns a JSON-ready document."""
    old_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        info_before = system_info()
        results = [run_case(case, settings, log) for case in make_cases(settings)]
        load_after = system_info()["load_average_1m"]
    finally:
        torch.set_num_threads(old_threads)
    return {
        "system": {**info_before, "load_average_1m_after": load_after},
        "settings": {"batch_size": settings.batch_size, "quick": settings.quick,
                     "reference_budget_s": settings.budget() or None},
        "notes": [
            "reference: one full float64 forward pass per sub-pixel; when it would take "
            "longer than the budget it is timed on its first sub-pixels and extrapolated "
            "linearly (each step is the same full pass)",
            "fast: cached decoder in float64, bit-identical to the reference; split = share "
            "of its time in rows (vertical stack), pixels (horizontal stack, skips, trunk), "
            "head (channel heads) and decide (argmax in the box)",
            "approx: one-pass approximation (IBM ART's PixelDefend: each sub-pixel's box "
            "argmax given the unpurified input), inexact, for comparison only; mismatch = "
            "share of sub-pixels where it differs from exact purification",
            "score: one bits/dim forward pass in float32 on the same batch",
            "dose: the default anomaly score (model pass with entropies, WebP codec, "
            "statistics, density) on the same batch",
            "roofline: GFLOP/s = FLOPs of the plain network (torch's FLOP counter: one "
            "forward pass for scoring and purification, forward + backward for a training "
            "step) / time; vs matmul = that rate / this thread's float32 1024x1024 matmul "
            "rate, measured in the same case",
            "vs plain: speed-up of the fast forward path over the plain NCHW one "
            "(reference_logits + cross-entropy, as before the fast path), both timed in "
            "the same case",
        ],
        "results": results,
    }


def sharded_scoring(settings: BenchSettings, n: int, sharding: Any) -> dict[str, Any]:
    """Scoring throughput per rank: `n` images of the first case, split over the ranks
    (`sharding.Sharding`, as `score` splits its inputs), each rank timing its own block
    after a common start. Total throughput is the images scored / the slowest rank's
    time; `balance` is that over the sum of the ranks' own rates (1: evenly shared)."""
    old_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        case = make_cases(settings)[0]
        repeats = (n + case.images.shape[0] - 1) // case.images.shape[0]
        window = sharding.window(n)
        images = case.images.repeat(repeats, 1, 1, 1)[window.start:window.stop]
        model = case.model.to(sharding.device).eval()
        sharding.dist.barrier()
        start = time.perf_counter()
        if images.shape[0]:
            bits_per_dim(model, images.to(sharding.device), batch_size=settings.batch_size)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(old_threads)
    mine = {"rank": sharding.dist.rank, "images": int(images.shape[0]), "seconds": seconds,
            "images_per_s": images.shape[0] / seconds if seconds > 0 else None}
    ranks = sharding.dist.gather(mine)
    wall = max(r["seconds"] for r in ranks)
    rates = [r["images_per_s"] for r in ranks if r["images_per_s"]]
    done = sum(r["images"] for r in ranks)  # n, or this --shard's block of it
    total = done / wall if wall > 0 else None
    return {"case": case.name, "n": done, "batch_size": settings.batch_size,
            "world": sharding.dist.world, "ranks": ranks, "images_per_s": total,
            "balance": (total / sum(rates)) if total and rates else None,
            "system": system_info()}


def sharded_scoring_lines(doc: dict[str, Any]) -> list[str]:
    """One line per rank and a total line, for the terminal."""
    lines = [f"rank {r['rank']}/{doc['world']}: {r['images']} images in {r['seconds']:.2f} s "
             f"= {r['images_per_s'] or 0:.0f} images/s" for r in doc["ranks"]]
    lines.append(f"total: {doc['n']} images ({doc['case']}, batch {doc['batch_size']}) at "
                 f"{doc['images_per_s'] or 0:.0f} images/s over {doc['world']} rank(s); "
                 f"balance {doc['balance'] or 0:.0%} (load average "
                 f"{doc['system']['load_average_1m'] or 0:.1f})")
    return lines


# ------------------------------------------------------------ data-parallel training


@dataclass
class ScalingSettings:
    """A short data-parallel training run per world size, on random images (the cost of
    a step does not depend on their content)."""

    ranks: tuple[int, ...] = (1, 2)
    batch_size: int = 64  # the global batch, split across ranks (train.py)
    steps: int = 8  # timed steps per world size, after `warmup` untimed ones
    warmup: int = 2
    threads: int = 1  # intra-op threads per rank
    preset: str = "small"
    shape: tuple[int, int, int] = (1, 28, 28)
    levels: int = 256
    seed: int = 0


def training_scaling(settings: ScalingSettings,
                     log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Training throughput (images/s) with 1, 2, ... ranks, each a process group of its
    own (gloo on the CPU, nccl when there is a GPU per rank) running the real training
    loop (`train.run_training`, DistributedDataParallel above one rank), and the scaling
    efficiency: throughput with N ranks / (N x throughput with 1)."""
    import tempfile

    import torch.multiprocessing as mp

    rows = []
    for world in settings.ranks:
        log(f"training with {world} rank(s)")
        with tempfile.TemporaryDirectory(prefix="pixeldefend-bench-") as tmp:
            result = Path(tmp) / "result.txt"
            mp.start_processes(_scaling_worker, args=(world, tmp, settings), nprocs=world,
                               join=True, start_method="spawn")
            seconds = float(result.read_text())
        images = settings.steps * settings.batch_size
        rows.append({"ranks": world, "images_per_s": images / seconds,
                     "step_s": seconds / settings.steps})
    base = next((r["images_per_s"] for r in rows if r["ranks"] == 1), None)
    for row in rows:
        row["efficiency"] = None if base is None else row["images_per_s"] / (row["ranks"] * base)
    backend = "nccl" if _scaling_device(max(settings.ranks), 0).type == "cuda" else "gloo"
    return {"backend": backend, "batch_size": settings.batch_size, "steps": settings.steps,
            "threads_per_rank": settings.threads, "preset": settings.preset,
            "shape": list(settings.shape), "levels": settings.levels, "rows": rows}


def _scaling_device(world: int, rank: int) -> torch.device:
    """A GPU per rank when there are enough, else the CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world:
        return torch.device("cuda", rank)
    return torch.device("cpu")


class _StepClock:
    """Training progress that only notes when each optimisation step ended."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def start(self, total_epochs: int, batches_per_epoch: int, first_epoch: int) -> None:
        pass

    def batch(self, loss: float) -> None:
        self.times.append(time.perf_counter())

    def epoch(self, epoch: int, train_metric: float, val_metric: float, best: bool) -> None:
        pass


def _scaling_worker(rank: int, world: int, tmp: str, settings: ScalingSettings) -> None:
    """One rank of a `training_scaling` run; rank 0 writes the timed seconds to tmp."""
    from .distributed import Dist
    from .train import TrainSettings, run_training

    torch.set_num_threads(settings.threads)
    device = _scaling_device(world, rank)
    if world > 1:
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/store",
            rank=rank, world_size=world)
    try:
        torch.manual_seed(settings.seed)
        model = PixelCNN(PixelCNNConfig.from_preset(settings.preset, *settings.shape,
                                                    settings.levels))
        n = settings.batch_size * (settings.warmup + settings.steps)
        images = torch.randint(0, settings.levels, (n, *settings.shape), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(settings.seed))

        def loss_fn(m: torch.nn.Module, x: torch.Tensor, _y: Any) -> torch.Tensor:
            return m(x, nll=True).mean()  # as train runs it (fused head, float32 softmax)

        clock = _StepClock()
        run_training(model, loss_fn, images, None, lambda m, block: (0.0, len(block)),
                     TrainSettings(epochs=1, batch_size=settings.batch_size, seed=settings.seed),
                     device, progress=clock, val_size=0, micro_batch=model.images_per_pass(),
                     dist=Dist(rank=rank, world=world, local_rank=rank, device=device))
        if rank == 0:
            seconds = clock.times[-1] - clock.times[settings.warmup - 1]
            (Path(tmp) / "result.txt").write_text(repr(seconds))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def parse_cases(text: str) -> tuple[str, ...]:
    """'digits,28x28x1' -> the cases to run, in that order (at least one; known names)."""
    chosen = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in chosen if c not in CASE_NAMES]
    if unknown or not chosen:
        raise UsageError(f"cases takes {', '.join(CASE_NAMES)}, not {', '.join(unknown)}",
                         param="cases")
    return chosen


def parse_ranks(text: str) -> tuple[int, ...]:
    """'1,2' -> (1, 2); '' or '0' -> () (skip the scaling runs)."""
    try:
        ranks = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise UsageError(f"train_ranks takes comma-separated rank counts, e.g. 1,2, not "
                         f"{text!r}", param="train_ranks") from None
    if any(r < 0 for r in ranks):
        raise UsageError("train_ranks: rank counts must be positive", param="train_ranks")
    return tuple(r for r in ranks if r > 0)


def run_training_scaling(ranks: tuple[int, ...], batch_size: int, quick: bool,
                         threads: int | None,
                         log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """`training_scaling` with bench's batch and a shorter run under quick."""
    settings = ScalingSettings(ranks=ranks, batch_size=batch_size, threads=threads or 1,
                               steps=4 if quick else 8, warmup=1 if quick else 2)
    return training_scaling(settings, log=log)
