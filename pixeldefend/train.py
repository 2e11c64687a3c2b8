"""A small, resumable training loop shared by the PixelCNN and the classifier.

Each epoch ends with an atomic checkpoint (model, optimiser, best weights, history, RNG
state) in safetensors + JSON, so Ctrl-C or a killed process loses at most one epoch and
`--resume` continues bit for bit where the last completed epoch left off.

Under `torchrun` the same loop runs data-parallel (DistributedDataParallel; gloo on the
CPU, nccl on CUDA). `batch_size` is the *global* batch: every step takes the same
shuffled global batch as one process would and splits it into one contiguous block per
rank, and each rank's loss is weighted by its share of the batch, so the all-reduced
gradient is the one-process gradient and the learning rate needs no rescaling. Validation
is sharded and reduced as exact sums. Rank 0 alone writes checkpoints and reports
progress; a checkpoint holds nothing per rank, so `--resume` works with any number of
ranks. (DistributedSampler would pad each rank's share with repeated images and change
which images share a step; slicing the one-process batch keeps the runs comparable.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_dir, only_entries
from .distributed import Dist, init
from .errors import UsageError
from .precision import autocast, check_precision, grad_scaler


@dataclass
class TrainSettings:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    lr_decay: float = 0.97  # multiplied into the learning rate after every epoch
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    patience: int = 0  # stop after this many epochs without a better validation score (0: never)
    precision: str = "fp32"  # forward pass: fp32, bf16 or fp16 (precision.py)
    compile: bool = False  # run the loss's module through torch.compile (compilation.py)


class TrainProgress(Protocol):
    """What the loop reports; the CLI renders it with Rich, the library stays silent."""

    def start(self, total_epochs: int, batches_per_epoch: int, first_epoch: int) -> None: ...
    def batch(self, loss: float) -> None: ...
    def epoch(self, epoch: int, train_metric: float, val_metric: float, best: bool) -> None: ...


class SilentProgress:
    def start(self, total_epochs: int, batches_per_epoch: int, first_epoch: int) -> None:
        pass

    def batch(self, loss: float) -> None:
        pass

    def epoch(self, epoch: int, train_metric: float, val_metric: float, best: bool) -> None:
        pass


@dataclass
class TrainResult:
    best_epoch: int
    best_val: float
    history: list[dict[str, float]] = field(default_factory=list)
    epochs_run: int = 0
    seconds: float = 0.0  # training time, summed over resumed runs
    stopped_by_budget: bool = False


def out_of_budget(elapsed: float, epoch_seconds: list[float], max_seconds: float | None
                  ) -> bool:
    """Would another epoch end past `max_seconds` of training? Judged by the slowest
    epoch so far, so the budget is a limit, not a target (None: no budget)."""
    if max_seconds is None:
        return False
    return elapsed >= max_seconds or (bool(epoch_seconds)
                                      and elapsed + max(epoch_seconds) > max_seconds)


# ------------------------------------------------------------------------ checkpoints

CKPT_TENSORS = "checkpoint.safetensors"
CKPT_META = "checkpoint.json"
CHECKPOINT_FILES = frozenset({CKPT_TENSORS, CKPT_META})


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, entries in state["state"].items():
        for name, value in entries.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().clone()
    return tensors, {"param_groups": state["param_groups"]}


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    best_state: dict[str, torch.Tensor], meta: dict[str, Any],
                    scaler: torch.amp.GradScaler | None = None) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {**meta, "optimizer": opt_meta}
    if scaler is not None and scaler.is_enabled():
        meta["grad_scaler"] = scaler.state_dict()
    with atomic_dir(directory, replaceable=only_entries(CHECKPOINT_FILES)) as tmp:
        save_file(tensors, str(tmp / CKPT_TENSORS))
        (tmp / CKPT_META).write_text(json.dumps(meta, indent=2))


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None = None
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        tensors = load_file(str(directory / CKPT_TENSORS))
        meta = json.loads((directory / CKPT_META).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{directory}: cannot read checkpoint to resume from ({exc})") from exc
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state,
                               "param_groups": meta["optimizer"]["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if scaler is not None and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
    return meta, best


def same_settings(recorded: dict[str, Any] | None, settings: TrainSettings) -> bool:
    """A checkpoint's settings equal `settings`; fields it predates count as their
    defaults (a checkpoint without `precision` was made in fp32). `compile` changes how the
    steps run, not what they compute: a run may be resumed with or without it."""
    how = {"compile": settings.compile}
    return recorded is not None and \
        {**asdict(TrainSettings()), **recorded, **how} == asdict(settings)


# ----------------------------------------------------------------------------- loop


Evaluate = Callable[[nn.Module, range], tuple[float, int]]
"""(model, indices of validation images) -> (the metric summed over them, their count).
Each rank evaluates its own block; the loop adds the sums over ranks and divides once,
so the validation metric is exact whatever the number of ranks."""


def run_training(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor | None,
    evaluate: Evaluate,
    settings: TrainSettings,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: TrainProgress | None = None,
    train_metric: Callable[[float], float] = lambda loss: loss,
    *,
    val_size: int,
    dist: Dist | None = None,
    max_seconds: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    micro_batch: int | None = None,
) -> TrainResult:
    """Minimise `loss_fn` over (images, labels) with Adam; keep the weights with the lowest
    validation metric (`evaluate` over `val_size` images, lower is better) and load them at
    the end. `dist`: the process group (default: torchrun's if launched by it, else one
    process); with more than one rank the model is trained with DistributedDataParallel.

    `max_seconds`: a wall-clock budget for training (by `clock`), counted over resumed
    runs too: no epoch starts that would, at the pace of the slowest one so far, end past
    it. Every finished epoch is checkpointed, so a budgeted run can be resumed later.
    `micro_batch`: see `backward_in_parts` (None: whole batches; not for batch norm)."""
    dist = dist or init(device)
    device = dist.device if dist.active else device
    if not dist.is_main:
        progress = None  # rank 0 alone reports
    progress = progress or SilentProgress()
    check_precision(settings.precision, device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr,
                                 weight_decay=settings.weight_decay)
    scaler = grad_scaler(device, settings.precision)
    batches = max(1, math.ceil(images.shape[0] / settings.batch_size))
    torch.manual_seed(settings.seed)
    meta, best_state = _resume(checkpoint_dir, model, optimizer, scaler, settings) if resume \
        else ({"epoch": -1, "history": [], "best_val": float("inf"), "best_epoch": -1},
              _cpu_state(model))
    first_epoch, history = meta["epoch"] + 1, meta["history"]
    epoch_seconds = list(meta.get("epoch_seconds", []))
    best_val, best_epoch = meta["best_val"], meta["best_epoch"]
    net = _data_parallel(model, dist, lambda: _leaves_parameters_unused(
        model, loss_fn, images[:1].to(device), None if labels is None else labels[:1].to(device)),
        compile=settings.compile)
    progress.start(settings.epochs, batches, first_epoch)
    stopped_by_budget = False
    for epoch in range(first_epoch, settings.epochs):
        if settings.patience and best_epoch >= 0 and epoch - best_epoch > settings.patience:
            break  # early stop: the best weights are already kept
        if out_of_budget(sum(epoch_seconds), epoch_seconds, max_seconds):
            stopped_by_budget = True
            break
        epoch_start = clock()
        total, count = _train_epoch(epoch, net, model, loss_fn, images, labels, optimizer,
                                    scaler, settings, dist, device, micro_batch,
                                    lambda mean: progress.batch(train_metric(mean)))
        val = _validate(evaluate, model, val_size, dist)
        improved = val < best_val
        if improved:
            best_val, best_epoch, best_state = val, epoch, _cpu_state(model)
        history.append({"epoch": epoch, "train": train_metric(total / count), "val": val})
        epoch_seconds.append(clock() - epoch_start)
        progress.epoch(epoch, train_metric(total / count), val, improved)
        if checkpoint_dir is not None:
            _checkpoint_epoch(checkpoint_dir, model, optimizer, scaler, best_state, dist, {
                "epoch": epoch, "history": history, "best_val": best_val,
                "best_epoch": best_epoch, "settings": asdict(settings),
                "world": dist.world,  # for the record: resuming may use any number
                "epoch_seconds": epoch_seconds,
            })
    del net
    _keep_best(model, best_state)
    return TrainResult(best_epoch=best_epoch, best_val=best_val, history=history,
                       epochs_run=len(history), seconds=sum(epoch_seconds),
                       stopped_by_budget=stopped_by_budget)


def _keep_best(model: nn.Module, best_state: dict[str, torch.Tensor]) -> None:
    """End of training: plain batch norm again (if DDP synchronised it), the best weights,
    evaluation mode."""
    plain_batchnorm(model)
    model.load_state_dict(best_state)
    model.eval()


def _train_epoch(epoch: int, net: nn.Module, model: nn.Module, loss_fn: Callable,
                 images: torch.Tensor, labels: torch.Tensor | None,
                 optimizer: torch.optim.Optimizer, scaler: Any, settings: TrainSettings,
                 dist: Dist, device: torch.device, micro_batch: int | None,
                 report: Callable[[float], None]) -> tuple[float, float]:
    """One pass over the seeded shuffle of `images` at this epoch's learning rate; returns
    the summed loss and image count over every rank (`report` gets the running mean)."""
    for group in optimizer.param_groups:
        group["lr"] = settings.lr * settings.lr_decay**epoch
    if dist.rank > 0:  # rank 0 continues the checkpointed stream; the others fork it
        torch.manual_seed(_rank_seed(settings.seed, epoch, dist.rank))
    model.train()
    n = images.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed + epoch))
    total, count = 0.0, 0
    for b in range(max(1, math.ceil(n / settings.batch_size))):
        index = order[b * settings.batch_size : (b + 1) * settings.batch_size]
        loss, size = _step(net, model, loss_fn, images, labels, index, optimizer, scaler,
                           settings, dist, device, micro_batch)
        total, count = total + loss * size, count + size
        report(total / max(count, 1))
    model.eval()
    return _summed(total, count, dist)


def _summed(total: float, count: int, dist: Dist) -> tuple[float, float]:
    """(total, count) added over every rank (unchanged in one process)."""
    if not dist.active:
        return total, count
    total_all, count_all = dist.all_sum(torch.tensor([total, count], dtype=torch.float64))
    return float(total_all), float(count_all)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights on the CPU (the best epoch's, kept across later epochs)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _checkpoint_epoch(checkpoint_dir: Path, model: nn.Module,
                      optimizer: torch.optim.Optimizer, scaler: Any,
                      best_state: dict[str, torch.Tensor], dist: Dist,
                      meta: dict[str, Any]) -> None:
    """Rank 0 writes the epoch's checkpoint; every rank waits until it exists."""
    if dist.is_main:
        save_checkpoint(checkpoint_dir, model, optimizer, best_state, meta, scaler)
    dist.barrier()
    _crash_if_asked(meta["epoch"], dist)


def _resume(checkpoint_dir: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: Any, settings: TrainSettings) -> tuple[dict[str, Any], dict]:
    """The checkpoint's metadata and best weights, loaded into the model, optimiser and
    scaler; a UsageError when there is none or it was made with other settings."""
    if checkpoint_dir is None or not (checkpoint_dir / CKPT_META).exists():
        raise UsageError(f"resume: no checkpoint in {checkpoint_dir}", param="resume")
    meta, best_state = load_checkpoint(checkpoint_dir, model, optimizer, scaler)
    if not same_settings(meta.get("settings"), settings):
        raise UsageError(
            f"resume: checkpoint in {checkpoint_dir} was made with other settings "
            f"({meta.get('settings')}); rerun with the same options or without resume",
            param="resume")
    return meta, best_state


def _step(net: nn.Module, model: nn.Module, loss_fn: Callable, images: torch.Tensor,
          labels: torch.Tensor | None, index: torch.Tensor,
          optimizer: torch.optim.Optimizer, scaler: Any, settings: TrainSettings, dist: Dist,
          device: torch.device, micro_batch: int | None) -> tuple[float, int]:
    """One optimisation step on this rank's share of the global batch `index`; returns
    the mean loss and how many images count towards the epoch's loss (0 for a rank that
    only joined the all-reduce with a weight-0 image)."""
    index, weight = _my_share(index, dist)
    x = images[index].to(device)
    y = None if labels is None else labels[index].to(device)
    optimizer.zero_grad(set_to_none=True)
    loss = backward_in_parts(
        net, loss_fn, x, y, micro_batch,
        backward=lambda part: scaler.scale(part * weight if dist.active else part).backward(),
        context=lambda: autocast(device, settings.precision))
    if settings.grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, x.shape[0] if weight else 0


def backward_in_parts(model: nn.Module, loss_fn: Callable, x: torch.Tensor,
                      y: torch.Tensor | None, micro_batch: int | None,
                      backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                      context: Callable[[], contextlib.AbstractContextManager] =
                      contextlib.nullcontext) -> float:
    """Backpropagate `loss_fn`'s batch mean `micro_batch` images at a time (the same
    gradient up to rounding, for a loss that is a mean over images): smaller passes keep
    their activations in the CPU's cache, which makes the step faster. `backward` runs
    each part's backward (loss scaling, rank weights), `context` wraps each forward
    (autocast); under DistributedDataParallel only the last part synchronises gradients.
    Returns the batch's loss."""
    n = x.shape[0]
    if not micro_batch or micro_batch >= n:
        with context():
            loss = loss_fn(model, x, y)
        backward(loss)
        return loss.item()
    total = 0.0
    for s in range(0, n, micro_batch):
        last = s + micro_batch >= n
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") \
            else model.no_sync()
        with sync:
            with context():
                part = loss_fn(model, x[s:s + micro_batch],
                               None if y is None else y[s:s + micro_batch])
                part = part * (x[s:s + micro_batch].shape[0] / n)
            backward(part)
        total += part.item()
    return total


def _data_parallel(model: nn.Module, dist: Dist, unused: Callable[[], bool], *,
                   compile: bool = False) -> nn.Module:
    """The module the loss runs through: DistributedDataParallel over the group (it
    broadcasts rank 0's weights now and all-reduces the gradients of every backward),
    or the model itself in one process; `compile`d in place once wrapped (compilation.py).
    `unused()`: does the loss leave parameters without a gradient? DDP must then look for
    them every step (their gradients stay None, as in one process)."""
    net = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        if wants_sync_batchnorm(model, dist.device):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused())
    if compile:
        from .compilation import compile_module

        compile_module(net)
    return net


def wants_sync_batchnorm(model: nn.Module, device: torch.device) -> bool:
    """Batch norm under DDP on CUDA computes its batch statistics over the global batch
    (SyncBatchNorm), as one process would. torch's SyncBatchNorm trains only on GPU-like
    devices, so on the CPU (gloo) each rank normalises by its own share of the batch (a
    2-rank run then differs a little from one process; `ClassifierConfig(norm="group")`
    does not). Only BatchNorm2d models are converted, since `plain_batchnorm` turns them
    back."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return device.type == "cuda" and bool(norms) and all(
        type(m) is nn.BatchNorm2d for m in norms)


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """Undo `convert_sync_batchnorm` in place after training (torch has no inverse): the
    same parameters and buffers in a BatchNorm2d, so the bundle runs anywhere."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum,
                                   child.affine, child.track_running_stats)
            plain.load_state_dict(child.state_dict())
            plain.train(child.training)
            tensors = [*child.parameters(), *child.buffers()]
            setattr(module, name, plain.to(tensors[0].device) if tensors else plain)
        else:
            plain_batchnorm(child)
    return module


def _leaves_parameters_unused(model: nn.Module, loss_fn: Callable[..., torch.Tensor],
                              x: torch.Tensor, y: torch.Tensor | None) -> bool:
    """True if the loss of one image reaches not every parameter (the last layer's stack
    outputs of a PixelCNN feed nothing). The random state and the buffers (BatchNorm's
    running statistics) are put back afterwards, so the probe does not change the run."""
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        loss = loss_fn(model, x, y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
    return any(g is None for g in grads)


def _my_share(index: torch.Tensor, dist: Dist) -> tuple[torch.Tensor, float]:
    """This rank's contiguous block of a global batch, and the weight that makes the
    ranks' averaged gradient the mean over the whole batch: DDP averages over ranks, so a
    block of k of the batch's B images is weighted k * world / B. A rank left without
    images (a last batch smaller than the world) still runs one image, weighted 0,
    because every rank must take part in each gradient all-reduce."""
    if not dist.active:
        return index, 1.0
    block = dist.shard(len(index))
    mine = index[block.start : block.stop]
    if len(mine) == 0:
        return index[:1], 0.0
    return mine, len(mine) * dist.world / len(index)


def _validate(evaluate: Evaluate, model: nn.Module, val_size: int, dist: Dist) -> float:
    """The validation metric over all `val_size` images, each rank scoring its block."""
    block = dist.shard(val_size)
    total, count = evaluate(model, block)
    if dist.active:
        total, count = (float(v) for v in dist.all_sum(
            torch.tensor([total, count], dtype=torch.float64)))
    return float(total / count) if count else float("nan")


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed per (run, epoch, rank) for the random draws inside the loss (dropout,
    mutations, augmentation), so ranks do not repeat each other's draws and a resumed
    run repeats them."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**63


CRASH_ENV = "PIXELDEFEND_TEST_CRASH_AFTER_EPOCH"


def _crash_if_asked(epoch: int, dist: Dist) -> None:
    """Test hook: `PIXELDEFEND_TEST_CRASH_AFTER_EPOCH=R:E` makes rank R kill itself with
    SIGKILL right after epoch E's checkpoint, a deterministic stand-in for a node that
    dies mid-training (the tests then check that --resume finishes the run)."""
    spec = os.environ.get(CRASH_ENV)
    if spec and spec == f"{dist.rank}:{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)


def remove_checkpoint(checkpoint_dir: Path | None) -> None:
    """Delete the checkpoint files the loop wrote, and the folder if that empties it:
    anything else found there (put there by someone else) is left alone."""
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return
    for name in CHECKPOINT_FILES:
        (checkpoint_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: not ours to remove
        checkpoint_dir.rmdir()
