"""`--compile`: run the network's hot path through `torch.compile`.

What is compiled, and why there:
- training: the module the loss runs through, in place (`nn.Module.compile`), after it
  is wrapped in DistributedDataParallel. PyTorch's guidance for DDP is to compile the
  wrapped module, so that TorchDynamo's DDPOptimizer splits the graph at DDP's gradient
  buckets and all-reduce still overlaps the backward pass ("TorchDynamo and DDP",
  torch.compiler documentation). In place, so the state dict has no `_orig_mod.` prefix
  and bundles and checkpoints are the same as without it.
- scoring: the PixelCNN's trunk (`context_rows`: every convolution and gate, almost all
  of the time); the per-channel head and the float32 NLL stay eager.
- purification never: it runs the float64 cached decoder, bit-identical to the reference.

On this 2-core CPU it does not pay (README "Scaling out"): compiling takes 16-50 s and a
training step ran at 636 ms against 666 ms eager, scoring 200-206 ms against 188-193 ms.
It is meant for GPUs, where fusing the gates and activations saves memory traffic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import UsageError

BACKEND = "inductor"  # torch.compile's default; tests use "eager" to check the plumbing


def compile_module(module: nn.Module, backend: str | None = None) -> nn.Module:
    """`module`, compiled in place (its forward; parameters and state dict unchanged)."""
    module.compile(backend=backend or BACKEND, dynamic=False)
    return module


def compile_scoring(model: Any, backend: str | None = None) -> None:
    """Compile this PixelCNN's scoring trunk in place, then run it once on a blank batch,
    so a machine that cannot compile (no C++ compiler for inductor, an unsupported
    device) fails here with one clear line instead of in the middle of a run."""
    compiled = torch.compile(model.context_rows, backend=backend or BACKEND, dynamic=False)
    cfg = model.config
    blank = torch.zeros((model.images_per_pass(), cfg.channels, cfg.height, cfg.width),
                        device=next(model.parameters()).device)
    try:
        with torch.inference_mode():
            compiled(model.scale(blank))
    except Exception as err:  # torch raises many kinds (BackendCompilerFailed, OSError...)
        raise compile_failed(err) from err
    model.context_rows = compiled


def compile_failed(err: BaseException) -> UsageError:
    """torch.compile's failure as one line: the backend's own error, which TorchDynamo
    wraps (`inner_exception`, `__cause__`) in pages of internal traceback."""
    root = err
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
    text = str(root).strip()
    first = f"{type(root).__name__}: {text.splitlines()[0]}" if text else type(root).__name__
    return UsageError(f"torch.compile failed on this machine ({first}); run without "
                      "compile=True")


@contextlib.contextmanager
def compile_errors(enabled: bool) -> Iterator[None]:
    """Training compiles at its first step: its compiler errors become `compile_failed`."""
    if not enabled:
        yield
        return
    from torch._dynamo.exc import TorchDynamoException

    try:
        yield
    except TorchDynamoException as err:
        raise compile_failed(err) from err
