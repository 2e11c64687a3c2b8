"""A small, resumable training loop shared by the PixelCNN and the classifier.

Each epoch ends with an atomic checkpoint (model, optimiser, best weights, history, RNG
state) in safetensors + JSON, so Ctrl-C or a killed process loses at most one epoch and
`--resume` continues bit for bit where the last completed epoch left off.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_dir, only_entries
from .errors import UsageError


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
                    best_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {**meta, "optimizer": opt_meta}
    with atomic_dir(directory, replaceable=only_entries(CHECKPOINT_FILES)) as tmp:
        save_file(tensors, str(tmp / CKPT_TENSORS))
        (tmp / CKPT_META).write_text(json.dumps(meta, indent=2))


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
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
    return meta, best


# ----------------------------------------------------------------------------- loop


def run_training(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor | None,
    evaluate: Callable[[nn.Module], float],
    settings: TrainSettings,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: TrainProgress | None = None,
    train_metric: Callable[[float], float] = lambda loss: loss,
    max_seconds: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    micro_batch: int | None = None,
) -> TrainResult:
    """Minimise `loss_fn` over (images, labels) with Adam; keep the weights with the lowest
    `evaluate(model)` (validation metric, lower is better) and load them at the end.

    `max_seconds`: a wall-clock budget for training (by `clock`), counted over resumed
    runs too: no epoch starts that would, at the pace of the slowest one so far, end past
    it. Every finished epoch is checkpointed, so a budgeted run can be resumed later.
    `micro_batch`: see `backward_in_parts` (None: whole batches; not for batch norm)."""
    progress = progress or SilentProgress()
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr,
                                 weight_decay=settings.weight_decay)
    n = images.shape[0]
    batches = max(1, math.ceil(n / settings.batch_size))
    first_epoch, history, epoch_seconds = 0, [], []
    best_val, best_epoch = float("inf"), -1
    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(settings.seed)
    if resume:
        if checkpoint_dir is None or not (checkpoint_dir / CKPT_META).exists():
            raise UsageError(f"resume: no checkpoint in {checkpoint_dir}", param="resume")
        meta, best_state = load_checkpoint(checkpoint_dir, model, optimizer)
        if meta.get("settings") != asdict(settings):
            raise UsageError(
                f"resume: checkpoint in {checkpoint_dir} was made with other settings "
                f"({meta.get('settings')}); rerun with the same options or without resume",
                param="resume")
        first_epoch = meta["epoch"] + 1
        history = meta["history"]
        epoch_seconds = list(meta.get("epoch_seconds", []))
        best_val, best_epoch = meta["best_val"], meta["best_epoch"]
    progress.start(settings.epochs, batches, first_epoch)
    stopped_by_budget = False
    for epoch in range(first_epoch, settings.epochs):
        if settings.patience and best_epoch >= 0 and epoch - best_epoch > settings.patience:
            break  # early stop: the best weights are already kept
        if out_of_budget(sum(epoch_seconds), epoch_seconds, max_seconds):
            stopped_by_budget = True
            break
        epoch_start = clock()
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * settings.lr_decay**epoch
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed + epoch))
        total, count = 0.0, 0
        for b in range(batches):
            index = order[b * settings.batch_size : (b + 1) * settings.batch_size]
            x = images[index].to(device)
            y = None if labels is None else labels[index].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = backward_in_parts(model, loss_fn, x, y, micro_batch)
            if settings.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            total += loss * x.shape[0]
            count += x.shape[0]
            progress.batch(train_metric(total / count))
        model.eval()
        val = float(evaluate(model))
        improved = val < best_val
        if improved:
            best_val, best_epoch = val, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        history.append({"epoch": epoch, "train": train_metric(total / count), "val": val})
        epoch_seconds.append(clock() - epoch_start)
        progress.epoch(epoch, train_metric(total / count), val, improved)
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, model, optimizer, best_state, {
                "epoch": epoch, "history": history, "best_val": best_val,
                "best_epoch": best_epoch, "settings": asdict(settings),
                "epoch_seconds": epoch_seconds,
            })
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(best_epoch=best_epoch, best_val=best_val, history=history,
                       epochs_run=len(history), seconds=sum(epoch_seconds),
                       stopped_by_budget=stopped_by_budget)


def backward_in_parts(model: nn.Module, loss_fn: Callable, x: torch.Tensor,
                      y: torch.Tensor | None, micro_batch: int | None) -> float:
    """Backpropagate `loss_fn`'s batch mean `micro_batch` images at a time (the same
    gradient up to rounding, for a loss that is a mean over images): smaller passes keep
    their activations in the CPU's cache, which makes the step faster. Returns the loss."""
    n = x.shape[0]
    if not micro_batch or micro_batch >= n:
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss.item()
    total = 0.0
    for s in range(0, n, micro_batch):
        part = loss_fn(model, x[s:s + micro_batch], None if y is None else y[s:s + micro_batch])
        part = part * (x[s:s + micro_batch].shape[0] / n)
        part.backward()
        total += part.item()
    return total


def remove_checkpoint(checkpoint_dir: Path | None) -> None:
    if checkpoint_dir is not None and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
