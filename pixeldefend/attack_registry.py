"""The attack registry: every attack `pixeldefend attack` and `evaluate` know, one
`AttackSpec` each (name, help, factory, default steps, targeted, norm, cost, needs).

Adding an attack is one entry in `ATTACKS` (and its factory) here, plus its test:
`attacks.make_attack`, the CLI's `--method` choices and help, the targeted / L2 / step
defaults and `evaluate`'s cost estimate all read it. The module imports PyTorch and
torchattacks only inside the factories, so the CLI reads it for `--help` without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class AttackSpec:
    """One attack: how to build it and what the rest of the package needs to know."""

    name: str
    help: str
    # factory(net, params) -> torchattacks attack or callable (images, labels) -> images,
    # and the parameters it used (for the summary). `params` holds eps (a float, or None
    # for the L2 attacks), alpha, steps, seed, levels, num_classes and the method's own.
    factory: Callable[[nn.Module, dict[str, Any]], tuple[Any, dict[str, Any]]]
    default_steps: int | None = None
    targeted: bool = False  # supports --targeted
    norm: str = "linf"  # "linf", or "l2" (then clipped to the L-inf eps ball afterwards)
    cost: float = 0.4  # seconds per image relative to purifying one (one CPU thread)
    needs: tuple[str, ...] = ("eps",)  # parameters the factory cannot default


def _rand_attack(eps: float, levels: int) -> Callable[..., torch.Tensor]:
    """Uniform integer noise from torch's global RNG, which `attacks.run_attack` seeds per
    batch (like the random starts of the torchattacks attacks)."""
    import torch

    from .pixels import ball_levels

    ball = ball_levels(eps, levels)

    def run(images: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        noise = torch.randint(-ball, ball + 1, images.shape)
        return images + noise.to(images.device, images.dtype) / (levels - 1)

    return run


def _build_rand(_net: nn.Module, p: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    levels = int(p.get("levels") or 256)
    return _rand_attack(float(p["eps"]), levels), {"levels": levels}


def _build_fgsm(net: nn.Module, p: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torchattacks

    return torchattacks.FGSM(net, eps=float(p["eps"])), {}


def _step_size(p: dict[str, Any]) -> float:
    return float(p["alpha"]) if p.get("alpha") is not None else float(p["eps"]) / 4


def _build_bim(net: nn.Module, p: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torchattacks

    alpha, steps = _step_size(p), p["steps"]
    atk = torchattacks.BIM(net, eps=float(p["eps"]), alpha=alpha, steps=steps)
    return atk, {"alpha": alpha, "steps": steps}


def _build_pgd(net: nn.Module, p: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torchattacks

    alpha, steps = _step_size(p), p["steps"]
    random_start = bool(p.get("random_start", True))
    atk = torchattacks.PGD(net, eps=float(p["eps"]), alpha=alpha, steps=steps,
                           random_start=random_start)
    return atk, {"alpha": alpha, "steps": steps, "random_start": random_start}


def _build_cw(net: nn.Module, p: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torchattacks

    c, kappa = float(p.get("c", 1.0)), float(p.get("kappa", 0.0))
    lr = float(p.get("lr", 0.01))
    if c <= 0 or kappa < 0 or lr <= 0:
        raise UsageError("cw needs c > 0, kappa >= 0 and lr > 0")
    atk = torchattacks.CW(net, c=c, kappa=kappa, steps=p["steps"], lr=lr)
    return atk, {"c": c, "kappa": kappa, "lr": lr, "steps": p["steps"]}


def _build_deepfool(net: nn.Module, p: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torchattacks

    overshoot = float(p.get("overshoot", 0.02))
    if overshoot < 0:
        raise UsageError("deepfool needs overshoot >= 0")
    atk = torchattacks.DeepFool(net, steps=p["steps"], overshoot=overshoot)
    return atk, {"steps": p["steps"], "overshoot": overshoot}


def _build_autoattack(net: nn.Module, p: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torchattacks

    num_classes = p.get("num_classes")
    if num_classes is None:
        raise UsageError("autoattack needs num_classes")
    if int(num_classes) < 4:
        raise UsageError("autoattack's targeted parts need at least 4 classes")
    atk = torchattacks.AutoAttack(net, norm="Linf", eps=float(p["eps"]), version="standard",
                                  n_classes=int(num_classes), seed=int(p["seed"]))
    return atk, {"num_classes": int(num_classes), "version": "standard"}


ATTACKS: dict[str, AttackSpec] = {spec.name: spec for spec in (
    AttackSpec("rand", "uniform integer noise in the eps ball (a baseline, not an attack)",
               _build_rand, cost=0.3),
    AttackSpec("fgsm", "one signed-gradient step (Goodfellow et al. 2015)", _build_fgsm,
               targeted=True, cost=0.35),
    AttackSpec("bim", "iterated FGSM (Kurakin et al. 2017)", _build_bim, default_steps=10,
               targeted=True),
    AttackSpec("pgd", "projected gradient descent, random start (Madry et al. 2018)",
               _build_pgd, default_steps=10, targeted=True),
    AttackSpec("cw", "Carlini & Wagner L2 (2017), clipped to the eps ball", _build_cw,
               default_steps=50, targeted=True, norm="l2", cost=0.7, needs=()),
    AttackSpec("deepfool", "DeepFool L2 (Moosavi-Dezfooli et al. 2016), clipped to the "
               "eps ball", _build_deepfool, default_steps=50, norm="l2", cost=7.0, needs=()),
    AttackSpec("autoattack", "AutoAttack standard L-inf ensemble (Croce & Hein 2020)",
               _build_autoattack, cost=5.0, needs=("eps", "num_classes")),
)}
METHODS = tuple(ATTACKS)
TARGETED_METHODS = tuple(n for n, spec in ATTACKS.items() if spec.targeted)
L2_METHODS = tuple(n for n, spec in ATTACKS.items() if spec.norm == "l2")
DEFAULT_STEPS = {n: spec.default_steps for n, spec in ATTACKS.items()
                 if spec.default_steps is not None}
# per-image cost of each attack stage, for `evaluate`'s ETA
ATTACK_COST = {n: spec.cost for n, spec in ATTACKS.items()}


def attack_spec(name: str) -> AttackSpec:
    """The registry entry for `name` (case-insensitive), else a UsageError listing them."""
    spec = ATTACKS.get(name.lower())
    if spec is None:
        raise UsageError(f"unknown attack method {name!r}: choose from {', '.join(METHODS)}")
    return spec
