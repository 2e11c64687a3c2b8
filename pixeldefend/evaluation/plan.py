"""What an evaluation runs: settings, eps lists, columns and every stage with its cache key.

Stage names are the cache file stems (``<out>/cache/<name>.npz``), so they must stay
stable for ``--resume``; they are built here and nowhere else (`eps_tag`, `set_name`,
`attack_stage`, `purify_stage`, `bpda_stage`). Every stage's key is known before anything
runs (purification keys name their input by the key of the stage that made it), so
resume can tell up front what is left and the ETA covers only that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..adaptive import ATTACKS as SUITE_ATTACKS
from ..adaptive import SuiteSettings
from ..attacks import ATTACK_COST, DEFAULT_STEPS, METHODS, Eps, parse_eps
from ..bpda import DEFAULT_STEPS as BPDA_STEPS
from ..bpda import default_alpha
from ..defaults import DEFAULT_ATTACKS
from ..errors import UsageError
from ..pixels import from_8bit, level_fraction
from .defences import DEFENCES, column_key, column_label

SCHEMA = "pixeldefend.evaluate/1"
ADAPTIVE_ATTACKS = ("bpda", *SUITE_ATTACKS)  # "all" selects every one
DEFAULT_EPS = ("8/255", "25/255")
DEFAULT_EPS_DEFEND = (16, 32)  # of 255 levels, as in the paper
# cost of one image in units of "purify one image" (attack stages include scoring the
# adversarial images), measured on Fashion-MNIST with one CPU thread; for the ETA only
COST = {"clean": 0.4, **ATTACK_COST, "purify": 1.0,
        **{f"bpda-{name}": spec.bpda_cost for name, spec in DEFENCES.items()}}

Column = tuple[str, int | None]  # (defence, eps_defend)


@dataclass
class EvaluateSettings:
    """What to run. `eps` entries are text for `attacks.parse_eps` (`eps_levels`: whole
    pixel levels); `eps_defend` is in pixel levels of the images."""

    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    eps: tuple[str, ...] | None = None  # None: 8/255, 25/255 (at least 1 and 2 levels)
    eps_levels: bool = False
    eps_defend: tuple[int, ...] | None = None  # None: 16, 32 of 255 scaled to the levels
    defences: tuple[str, ...] = tuple(DEFENCES)
    adaptive_attack: str | None = "bpda"  # comma-separated names of ADAPTIVE_ATTACKS
    bpda_steps: int = BPDA_STEPS
    bpda_n: int | None = None  # BPDA on the first N images (None: all)
    bpda_eps: tuple[str, ...] | None = None  # BPDA at these of the eps (None: all)
    bpda_alpha: float | None = None  # fraction of [0, 1]; None: bpda.default_alpha
    eot: int = 1
    seed: int = 0
    batch_size: int = 128  # attack batches
    purify_batch: int = 256  # purification batches (large batches amortise the decoder)
    resume: bool = False
    suite: SuiteSettings = field(default_factory=SuiteSettings)  # pixeldefend.adaptive
    sanity_n: int = 50  # images for the sanity checks of the adaptive suite (0: none)

    @property
    def adaptive_names(self) -> tuple[str, ...]:
        """The adaptive attacks asked for ('all': every one)."""
        names = [a.strip().lower() for a in (self.adaptive_attack or "").split(",")
                 if a.strip()]
        if "all" in names:
            return ADAPTIVE_ATTACKS
        return tuple(a for a in names if a != "none")

    def checked(self) -> EvaluateSettings:
        """Raise UsageError for anything unknown or out of range; add the baseline column."""
        for name in self.attacks:
            if name not in METHODS:
                raise UsageError(f"unknown attack {name!r}: choose from {', '.join(METHODS)}")
        if not self.attacks and not self.adaptive_names:
            raise UsageError("nothing to evaluate: give attacks or adaptive_attack",
                             param=("attacks", "adaptive_attack"))
        for d in self.defences:
            if d not in DEFENCES:
                raise UsageError(f"unknown defence {d!r}: choose from {', '.join(DEFENCES)}")
        if "none" not in self.defences:
            self.defences = ("none", *self.defences)  # the baseline column is always there
        for a in self.adaptive_names:
            if a not in ADAPTIVE_ATTACKS:
                raise UsageError(f"unknown adaptive attack {a!r}: choose from "
                                 f"{', '.join(ADAPTIVE_ATTACKS)}, all or none")
        self.suite.attacks = tuple(a for a in SUITE_ATTACKS if a in self.adaptive_names)
        if self.eps_defend is not None and any(int(e) != e or e < 1 for e in self.eps_defend):
            raise UsageError("eps_defend takes positive whole pixel levels, e.g. 16,32",
                             param="eps_defend")
        if self.bpda_steps < 1 or self.eot < 1:
            raise UsageError("bpda_steps and eot must be at least 1", param=("bpda_steps", "eot"))
        if self.bpda_n is not None and self.bpda_n < 1:
            raise UsageError("bpda_n must be at least 1", param="bpda_n")
        if self.batch_size < 1 or self.purify_batch < 1:
            raise UsageError("batch sizes must be at least 1")
        return self


def parse_list(text: str | Sequence[str] | None) -> list[str] | None:
    """'a,b, c' -> ['a', 'b', 'c'] (None stays None)."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    return [s.strip() for s in items if s.strip()]


def default_eps_list(levels: int) -> list[tuple[str, Eps]]:
    """8/255 and 25/255 of the range; with few levels (digits: 17) 1 and 2 whole levels,
    because 8/255 is less than one level there and a quantised attack could do nothing."""
    budgets = [(text, parse_eps(text, levels)) for text in DEFAULT_EPS]
    if len({b.ball for _, b in budgets}) == len(budgets) and min(b.ball for _, b in budgets):
        return budgets
    return [(f"{k} level{'s' if k > 1 else ''}", parse_eps(k, levels, eps_levels=True))
            for k in (1, 2)]


def default_eps_defend_list(levels: int) -> list[int]:
    """16 and 32 of 255 levels scaled to the images' levels (at least 1, no repeats)."""
    out: list[int] = []
    for v in from_8bit(np.array(DEFAULT_EPS_DEFEND), levels).tolist():
        v = max(1, int(v))
        if v in out:
            v = out[-1] + 1
        out.append(v)
    return out


# ------------------------------------------------------------------ stage names


def eps_tag(eps: Eps) -> str:
    return f"eps{eps.ball}"


def set_name(attack: str, eps: Eps) -> str:
    """An image set: ``clean`` or ``<attack>-eps<ball>``."""
    return f"{attack}-{eps_tag(eps)}"


def attack_stage(image_set: str) -> str:
    return f"attack-{image_set}"


def purify_stage(image_set: str, eps_defend: int) -> str:
    return f"purify-{image_set}-e{eps_defend}"


def bpda_stage(eps: Eps, defence: str, eps_defend: int | None) -> str:
    return f"bpda-{eps_tag(eps)}-{column_key(defence, eps_defend).replace('@', '-e')}"


@dataclass
class Stage:
    """One unit of cached work."""

    name: str  # cache file stem
    label: str  # what the progress display says
    items: int  # images (or image-steps for BPDA) it processes
    weight: float  # cost per item, in "purify one image" units (for the ETA)
    cached: bool = False
    status: str = ""
    key: dict[str, Any] = field(default_factory=dict, repr=False)  # the cache key


# ------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """Everything decided before any work: eps budgets, columns, BPDA scope, stages."""

    settings: EvaluateSettings
    levels: int
    n: int
    threshold: float | None
    budgets: list[tuple[str, Eps]]
    eps_defend: list[int]
    columns: list[Column]
    bpda_n: int
    bpda_balls: set[int]
    alpha_of: dict[int, float]
    stages: dict[str, Stage] = field(default_factory=dict)

    @property
    def purifying(self) -> bool:
        return any(DEFENCES[d].purifies for d, _ in self.columns)

    @property
    def purify_mode(self) -> str:
        """'all' when a defence purifies every image, else only those above threshold."""
        every = any(DEFENCES[d].purifies and not DEFENCES[d].gated
                    for d in self.settings.defences)
        return "all" if every else "above-threshold"

    @property
    def sets(self) -> list[str]:
        """The image sets, in order: clean, then every attack at every eps."""
        return ["clean"] + [set_name(a, b) for a in self.settings.attacks
                            for _, b in self.budgets]

    @property
    def column_keys(self) -> list[str]:
        return [column_key(d, e) for d, e in self.columns]

    def bpda_budgets(self) -> list[tuple[int, str, Eps]]:
        """(eps index, text, eps) of the budgets BPDA runs at (none when it does not run)."""
        if "bpda" not in self.settings.adaptive_names:
            return []
        return [(bi, t, b) for bi, (t, b) in enumerate(self.budgets)
                if b.ball in self.bpda_balls]


def eps_budgets(settings: EvaluateSettings, levels: int) -> list[tuple[str, Eps]]:
    """(text, Eps) per --eps value, checked: at least one level, distinct balls."""
    if settings.eps is None:
        budgets = default_eps_list(levels)
    else:
        budgets = [(f"{text} level{'s' if str(text) != '1' else ''}"
                    if settings.eps_levels else str(text),
                    parse_eps(text, levels, settings.eps_levels)) for text in settings.eps]
    for text, b in budgets:
        if b.ball < 1:
            raise UsageError(f"eps {text} is {b.levels:.3g} levels of {levels}-level images, "
                             "less than one: a quantised attack cannot change a pixel (use a "
                             "larger eps, or eps_levels)", param=("eps", "eps_levels"))
    if len({b.ball for _, b in budgets}) != len(budgets):
        raise UsageError("two eps values give the same whole-level ball: "
                         + ", ".join(f"{t} -> {b.ball}" for t, b in budgets), param="eps")
    return budgets


def plan_columns(settings: EvaluateSettings, eps_defend: list[int],
                 threshold: float | None) -> list[Column]:
    """One column per defence (per eps_defend for purifying ones), in registry order."""
    columns: list[Column] = []
    for name, spec in DEFENCES.items():
        if name not in settings.defences:
            continue
        if spec.gated and threshold is None:
            raise UsageError(f"{spec.label} needs the model's bits/dim calibration: run "
                             f"`pixeldefend calibrate`, or leave {name} out of defences",
                             param="defences")
        columns += [(name, e) for e in eps_defend] if spec.purifies else [(name, None)]
    return columns


def make_plan(settings: EvaluateSettings, levels: int, n: int, threshold: float | None,
              base: dict[str, Any]) -> Plan:
    """The whole plan; `base` is the part of every key that names the models and images."""
    budgets = eps_budgets(settings, levels)
    eps_defend = list(settings.eps_defend or default_eps_defend_list(levels))
    if any(e >= levels for e in eps_defend):
        raise UsageError(f"eps_defend must be below {levels} levels", param="eps_defend")
    bpda_balls = {b.ball for _, b in budgets}
    if settings.bpda_eps is not None:
        bpda_balls = {parse_eps(t, levels, settings.eps_levels).ball for t in settings.bpda_eps}
        if bpda_balls - {b.ball for _, b in budgets}:
            raise UsageError("bpda_eps must be among the eps values", param=("bpda_eps", "eps"))
    alpha_of = {b.ball: settings.bpda_alpha or default_alpha(level_fraction(b.ball, levels),
                                                             settings.bpda_steps)
                for _, b in budgets}
    plan = Plan(settings, levels, n, threshold, budgets, eps_defend,
                plan_columns(settings, eps_defend, threshold),
                min(n, settings.bpda_n or n), bpda_balls, alpha_of)
    _plan_stages(plan, base)
    return plan


def _plan_stages(plan: Plan, base: dict[str, Any]) -> None:
    """Every stage in run order, each with its label, size, cost and cache key."""
    s, n = plan.settings, plan.n

    def add(name: str, label: str, items: int, weight: float, key: dict[str, Any]) -> None:
        plan.stages[name] = Stage(name, label, items, weight, key=key)

    add("clean", "score clean images", n, COST["clean"], {"stage": "clean", **base})
    for a in s.attacks:
        for text, b in plan.budgets:
            add(attack_stage(set_name(a, b)), f"attack {a} eps {text}", n, COST.get(a, 0.1),
                {"stage": "attack", **base, "method": a, "eps_ball": b.ball, "seed": s.seed,
                 "batch_size": s.batch_size, "default_steps": DEFAULT_STEPS.get(a),
                 "rng": "per-batch"})  # seeds per batch: no cache of the one-stream era
    if plan.purifying:
        for image_set in plan.sets:
            source = plan.stages["clean" if image_set == "clean" else
                                 attack_stage(image_set)].key
            for e in plan.eps_defend:
                add(purify_stage(image_set, e), f"purify {image_set} ε_def={e}", n,
                    COST["purify"], {"stage": "purify", "input": source, "eps_defend": e,
                                     "mode": plan.purify_mode})
    for _, text, b in plan.bpda_budgets():
        for d, e in plan.columns:
            steps = s.bpda_steps + 1 + (1 if DEFENCES[d].purifies else 0)
            add(bpda_stage(b, d, e), f"BPDA eps {text} vs {column_label(d, e)}",
                plan.bpda_n * steps, DEFENCES[d].bpda_cost,
                {"stage": "bpda", **base, "eps_ball": b.ball, "column": column_key(d, e),
                 "steps": s.bpda_steps, "alpha": plan.alpha_of[b.ball], "eot": s.eot,
                 "n": plan.bpda_n, "seed": s.seed,
                 **({"restarts": s.suite.restarts} if s.suite.restarts > 1 else {})})
