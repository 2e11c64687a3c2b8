"""Adaptive attacks on PixelDefend (Athalye et al. 2018; Tramèr et al. 2020).

Every attack here knows the defence, and every success is judged on the *exact* pipeline
(quantised adversarial image -> exact purifier -> classifier), never on a surrogate:

- ``bpda-surrogate``: PGD whose forward pass is the exact purifier and whose backward pass
  is the differentiable surrogate of `pixeldefend.surrogate` (BPDA with a relaxation of
  PixelDefend itself instead of the identity), temperature annealed towards argmax.
- ``surrogate-pgd``: PGD through classifier∘surrogate (full gradient, no exact forward);
  each iterate is checked on the exact pipeline.
- ``square``: Square Attack (Andriushchenko et al. 2020, torchattacks.Square, L∞,
  margin loss) querying the exact pipeline: gradient-free, so immune to masked gradients.
- ``detector``: for adaptive PixelDefend (which purifies only images above the bits/dim
  threshold): maximise the classifier's loss on the unpurified image minus a penalty
  λ·relu(bits/dim − threshold + margin); bits/dim is differentiated exactly (the PixelCNN's
  log-likelihood, linearly interpolated between neighbouring levels so the target values
  also get a gradient). Reports "fools the classifier" and "fools it while passing the gate".
  It starts from the clean image; ``detector-random`` is the same from a random point in
  the ball (noise costs bits/dim, but explores more).
- ``cw-bs``: Carlini-Wagner L2 with a binary search over c per image (see `cw_binary_search`
  for why torchattacks' CW is wrapped), clipped to the eps ball; an oblivious baseline
  evaluated through every defence.

`run_pgd`, `run_square`, `cw_binary_search` work on any models; `run_suite` runs the chosen
attacks per defence column, Square only on the images every earlier attack failed on (the
per-image worst case needs nothing else), and `sanity_checks` applies the Tramèr et al.
checks (accuracy -> 0 as eps grows, more steps never help the defence, loss rises).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attacks import quantise, quiet_stdout
from .bpda import StraightThroughPurifier, straight_through_quantise
from .density import LN2, bits_per_dim
from .surrogate import SoftPurifier

ATTACKS = ("cw-bs", "bpda-surrogate", "surrogate-pgd", "detector", "detector-random",
           "square")
DEFAULT_QUERIES = 1000
DEFAULT_T_START, DEFAULT_T_END = 1.0, 0.01
DETECTOR_LAMBDA = 10.0  # nats of classifier loss per bit/dim over the threshold
DETECTOR_MARGIN = 0.05  # bits/dim below the threshold the attack aims for


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval for k successes in n trials (as fractions)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def anneal(t: int, steps: int, start: float, end: float) -> float:
    """Geometric temperature schedule from `start` (step 0) to `end` (last step)."""
    if steps <= 1:
        return end
    return start * (end / start) ** (t / (steps - 1))


def interpolated_bpd(model: nn.Module, u: torch.Tensor) -> torch.Tensor:
    """Bits/dim of float-level images u (N, C, H, W), exact at integer u, differentiable
    in u both through the PixelCNN's context and through the target value (log-probabilities
    of the two neighbouring levels, linearly interpolated)."""
    levels = model.config.levels
    logp = torch.log_softmax(model.logits_from_scaled(u * (2.0 / (levels - 1)) - 1.0), 1)
    lo = torch.floor(u.detach()).clamp(0, levels - 2)
    w = u - lo
    lp_lo = logp.gather(1, lo.long().unsqueeze(1)).squeeze(1)
    lp_hi = logp.gather(1, (lo.long() + 1).unsqueeze(1)).squeeze(1)
    nll = -((1 - w) * lp_lo + w * lp_hi)
    return nll.flatten(1).sum(1) / (u[0].numel() * LN2)


# --------------------------------------------------------------------------- PGD


@dataclass
class AttackRun:
    """One attack against one defence: quantised images and what the exact pipeline did."""

    name: str
    adversarial: torch.Tensor  # uint8 (N, C, H, W) inside the eps ball
    pred: np.ndarray  # exact defended prediction on `adversarial`
    fooled: np.ndarray  # bool (N,): the exact pipeline misclassifies (the attack's goal)
    loss_curve: list[float] = field(default_factory=list)  # mean loss per step (restart 0)
    accuracy_curve: list[float] = field(default_factory=list)  # not yet fooled, per step
    passes_gate: np.ndarray | None = None  # bool (N,): bits/dim <= threshold (detector)
    summary: dict[str, Any] = field(default_factory=dict)


# objective(x float [0, 1] requiring grad, labels, step) -> (loss (N,) to maximise,
# logits of the exact pipeline on x, or None to have run_pgd compute them)
Objective = Callable[[torch.Tensor, torch.Tensor, int],
                     tuple[torch.Tensor, torch.Tensor | None]]


def _record(idx: torch.Tensor, success: torch.Tensor, last: bool, q: torch.Tensor,
            pred: torch.Tensor, ok: torch.Tensor | None, done: np.ndarray,
            adv: torch.Tensor, pred_out: torch.Tensor, gate_ok: np.ndarray) -> None:
    """Keep the iterates that succeed (at the last step every one, unless an earlier
    restart already succeeded on that image) and mark the successes done."""
    keep = torch.ones_like(success) if last else success
    sel = idx[keep]
    new = ~torch.from_numpy(done[sel.numpy()]) | success[keep]
    sel, qk, pk = sel[new], q[keep][new], pred[keep][new]
    adv[sel] = qk
    pred_out[sel] = pk
    if ok is not None:
        gate_ok[sel.numpy()] = ok[keep][new].numpy()
    done[idx[success].numpy()] = True


def run_pgd(name: str, objective: Objective,
            exact_logits: Callable[[torch.Tensor], torch.Tensor],
            images: torch.Tensor, labels: torch.Tensor, levels: int, ball: int, *,
            steps: int, alpha: float | None = None, restarts: int = 1,
            seed: int = 0, gate: Callable[[torch.Tensor], torch.Tensor] | None = None,
            random_start: bool = True,
            progress: Callable[[int], None] | None = None) -> AttackRun:
    """L∞ PGD (sign steps of `alpha`, default max(2.5/steps, 0.1)·eps; alpha = 0 is allowed
    and is the deliberately broken attack of the sanity tests) on uint8 `images`, judged on
    the exact pipeline. Each iterate is quantised (straight through) so the pipeline sees a
    real image; an image is done at its first iterate that the exact pipeline
    misclassifies (and, with `gate`, that passes it). The first run starts from a random
    point in the ball (`random_start`) or the image itself; restart r > 0 starts from a
    fresh random point and only attacks the images still not done."""
    n = images.shape[0]
    labels = torch.as_tensor(labels, dtype=torch.long)
    eps = ball / (levels - 1)
    step = eps * max(2.5 / steps, 0.1) if alpha is None else float(alpha)
    x0_all = images.float() / (levels - 1)
    adv = images.clone()
    pred_out = torch.full((n,), -1, dtype=torch.long)
    done = np.zeros(n, dtype=bool)
    gate_ok = np.ones(n, dtype=bool)
    last_loss = torch.zeros(n)
    loss_curve: list[float] = []
    acc_curve: list[float] = []
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    forwards = 0
    for r in range(restarts):
        active = torch.from_numpy(np.flatnonzero(~done))
        if len(active) == 0:
            break
        x0 = x0_all[active]
        noise = torch.randint(-ball, ball + 1, x0.shape, generator=gen).float()
        if r == 0 and not random_start:
            noise.zero_()
        x = (x0 + noise / (levels - 1)).clamp(0, 1)
        live = torch.arange(len(active))  # positions in `active` still being attacked
        for t in range(steps + 1):
            xa = x[live].clone().requires_grad_(t < steps)
            with torch.set_grad_enabled(t < steps):
                loss, logits = objective(straight_through_quantise(xa, levels),
                                         labels[active[live]], t)
            forwards += len(live)
            q = quantise(x[live], images[active[live]], levels, ball)
            if logits is None:
                with torch.no_grad():
                    logits = exact_logits(q.float() / (levels - 1))
            pred = logits.detach().argmax(1).cpu()
            idx = active[live]
            success = pred != labels[idx]
            ok = gate(q).cpu() if gate is not None else None
            if ok is not None:
                success = success & ok
            last_loss[idx] = loss.detach().float().cpu()
            _record(idx, success, t == steps, q, pred, ok, done, adv, pred_out, gate_ok)
            if r == 0:
                loss_curve.append(float(last_loss.mean()))
            acc_curve.append(float(1 - done.mean()))
            if progress is not None:
                progress(len(live))
            if t == steps:
                break
            grad = torch.autograd.grad(loss.sum(), xa)[0].cpu()
            still = ~success
            live, grad = live[still], grad[still]
            if len(live) == 0:
                break
            moved = x[live] + step * grad.sign()
            x[live] = torch.minimum(torch.maximum(moved, x0[live] - eps), x0[live] + eps
                                    ).clamp(0, 1)
    fooled = (pred_out != labels).numpy()
    return AttackRun(name, adv, pred_out.numpy(), fooled, loss_curve, acc_curve,
                     gate_ok if gate is not None else None,
                     {"steps": steps, "alpha": step, "restarts": restarts, "seed": seed,
                      "forward_passes": forwards,
                      "seconds": round(time.perf_counter() - start, 3)})


# --------------------------------------------------------------------------- Square


def run_square(defended: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               levels: int, ball: int, queries: int = DEFAULT_QUERIES, seed: int = 0,
               name: str = "square") -> AttackRun:
    """Square Attack (torchattacks.Square, L∞, margin loss, one restart) on `defended`
    (float [0, 1] images -> logits of the exact pipeline). Its vertices x ± eps are whole
    levels, so quantisation does not change them."""
    import torchattacks

    start = time.perf_counter()
    eps = ball / (levels - 1)
    labels = torch.as_tensor(labels, dtype=torch.long)
    x = images.float() / (levels - 1)
    was_training = defended.training
    defended.eval()  # torchattacks restores the mode it found: it must find eval
    with quiet_stdout():
        atk = torchattacks.Square(defended, norm="Linf", eps=eps, n_queries=queries,
                                  n_restarts=1, seed=seed, loss="margin", verbose=False)
        out = atk(x, labels)
    defended.eval()
    adv = quantise(out, images, levels, ball)
    with torch.no_grad():
        pred = defended(adv.float() / (levels - 1)).argmax(1).cpu()
    defended.train(was_training)
    return AttackRun(name, adv, pred.numpy(), (pred != labels).numpy(),
                     summary={"queries": queries, "seed": seed,
                              "seconds": round(time.perf_counter() - start, 3)})


# ----------------------------------------------------------------------------- CW


def cw_binary_search(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     levels: int, ball: int, *, steps: int = 100, search_steps: int = 6,
                     c_init: float = 1.0, kappa: float = 0.0, lr: float = 0.05
                     ) -> tuple[torch.Tensor, np.ndarray]:
    """Carlini-Wagner L2 with its binary search over c, one c per image.

    torchattacks.CW has no binary search, and its loss multiplies one scalar c by the
    *batch sum* of the margin term, so a per-image c cannot be passed in. We wrap it:
    a subclass whose margin term `f` is multiplied by a per-image c (the batch sum of
    c_i·f_i is then exactly the per-image objective), and run the standard search
    around it (success: smaller c next time; failure: 10× c until a success bounds it,
    then bisect). Success is judged on what the evaluation uses: the image clipped to
    the eps ball and quantised. The wrapper also keeps pixels at exactly 0 or 1 movable
    (torchattacks sends them to tanh-space infinity). Returns (uint8 images: per image
    the smallest-L2 success, else the last attempt; the smallest c that succeeded, NaN
    if none)."""
    import torchattacks

    class PerImageCW(torchattacks.CW):
        c_vec: torch.Tensor

        def f(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return self.c_vec.to(outputs.device) * super().f(outputs, labels)

        def inverse_tanh_space(self, x: torch.Tensor) -> torch.Tensor:
            # torchattacks maps pixels at exactly 0 or 1 to atanh(±1) = ±inf, where they
            # can never move (and dark backgrounds are most of an MNIST-like image)
            return self.atanh(torch.clamp(x * 2 - 1, min=-1 + 1e-6, max=1 - 1e-6))

    labels = torch.as_tensor(labels, dtype=torch.long)
    n = images.shape[0]
    x = images.float() / (levels - 1)
    eps = ball / (levels - 1)
    c = torch.full((n,), float(c_init))
    lo, hi = torch.zeros(n), torch.full((n,), math.inf)
    best = quantise(x, images, levels, ball)
    best_l2 = torch.full((n,), math.inf)
    with quiet_stdout():
        atk = PerImageCW(model, c=1.0, kappa=kappa, steps=steps, lr=lr)
    for _ in range(search_steps):
        atk.c_vec = c.clone()
        with quiet_stdout():
            out = atk(x, labels)
        out = torch.minimum(torch.maximum(out.detach().cpu(), x - eps), x + eps)
        q = quantise(out, images, levels, ball)
        with torch.no_grad():
            pred = model(q.float() / (levels - 1)).argmax(1).cpu()
        ok = pred != labels
        l2 = (q.float() - images.float()).flatten(1).norm(dim=1)
        better = ok & (l2 < best_l2)
        best[better], best_l2[better] = q[better], l2[better]
        hi = torch.where(ok, torch.minimum(hi, c), hi)
        lo = torch.where(ok, lo, torch.maximum(lo, c))
        c = torch.where(torch.isinf(hi), c * 10, (lo + hi) / 2)
    never = torch.isinf(best_l2)
    best[never] = q[never]
    return best, torch.where(torch.isinf(hi), torch.nan, hi).numpy()


# --------------------------------------------------------------------------- suite


@dataclass
class SuiteSettings:
    """What `run_suite` runs; steps and restarts apply to the PGD-style attacks."""

    attacks: tuple[str, ...] = ATTACKS
    steps: int = 50
    restarts: int = 1
    queries: int = DEFAULT_QUERIES
    alpha: float | None = None
    t_start: float = DEFAULT_T_START
    t_end: float = DEFAULT_T_END
    passes: int = 1
    box_softness: float = 1.0  # levels; see surrogate.soft_purify_levels
    cw_steps: int = 100
    cw_search: int = 6
    # attacks run only on the images every earlier attack failed on (the per-image worst
    # case needs nothing else; each costs a purification per query or step)
    on_survivors: tuple[str, ...] = ("square",)
    square_all: bool = False  # Square on every image, not only the survivors
    square_n: int | None = None  # at most this many (the first) survivors: CPU budget
    seed: int = 0
    batch_size: int = 256

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def pgd_key(self) -> dict[str, Any]:
        """The settings a PGD-style attack's result depends on (its cache key)."""
        keep = ("steps", "restarts", "alpha", "t_start", "t_end", "passes", "box_softness",
                "seed", "batch_size")
        return {k: getattr(self, k) for k in keep}


def exact_pipeline(model: nn.Module, classifier: nn.Module, defence: str,
                   eps_defend: int | None, threshold: float | None,
                   batch_size: int = 256) -> nn.Module:
    """Float [0, 1] images -> logits of classifier ∘ exact purifier for one column."""
    if defence == "none":
        return classifier.eval()
    return StraightThroughPurifier(model, classifier, int(eps_defend or 0),
                                   threshold if defence == "adaptive" else None,
                                   batch_size).eval()


def attack_column(name: str, model: nn.Module, classifier: nn.Module, defence: str,
                  eps_defend: int | None, threshold: float | None,
                  images: torch.Tensor, labels: torch.Tensor, levels: int, ball: int,
                  settings: SuiteSettings, progress: Callable[[int], None] | None = None
                  ) -> AttackRun:
    """Run one adaptive attack (not cw-bs, which is oblivious) against one column."""
    exact = exact_pipeline(model, classifier, defence, eps_defend, threshold,
                           settings.batch_size)
    labels = torch.as_tensor(labels, dtype=torch.long)
    steps = settings.steps
    thr = threshold if defence == "adaptive" else None

    def temp(t: int) -> float:
        return anneal(t, steps, settings.t_start, settings.t_end)

    if name == "square":
        return run_square(exact, images, labels, levels, ball, settings.queries,
                          settings.seed)
    if name == "bpda-surrogate":
        if defence == "none":
            raise ValueError("bpda-surrogate needs a purifying column")
        soft = SoftPurifier(model, int(eps_defend or 0), passes=settings.passes,
                            straight_through=True, batch_size=settings.batch_size,
                            threshold=thr, box_softness=settings.box_softness)

        def objective(x: torch.Tensor, y: torch.Tensor, t: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
            soft.temperature = temp(t)
            logits = classifier(soft(x))
            return F.cross_entropy(logits, y, reduction="none"), logits
    elif name == "surrogate-pgd":
        soft = SoftPurifier(model, int(eps_defend or 0), passes=settings.passes,
                            box_softness=settings.box_softness)

        def objective(x: torch.Tensor, y: torch.Tensor, t: int) -> tuple[torch.Tensor, None]:
            soft.temperature = temp(t)
            purified = soft(x)
            if thr is not None:  # adaptive: only images above the gate are purified
                with torch.no_grad():
                    q = torch.round(x.detach() * (levels - 1)).to(torch.uint8)
                    above = (bits_per_dim(model, q) > thr).view(-1, 1, 1, 1)
                purified = torch.where(above, purified, x)
            return F.cross_entropy(classifier(purified), y, reduction="none"), None
    elif name in ("detector", "detector-random"):
        if thr is None:
            raise ValueError("the detector-aware attack needs the adaptive column")
        target = thr - DETECTOR_MARGIN

        def objective(x: torch.Tensor, y: torch.Tensor, t: int) -> tuple[torch.Tensor, None]:
            ce = F.cross_entropy(classifier(x), y, reduction="none")
            bpd = interpolated_bpd(model, x * (levels - 1))
            return ce - DETECTOR_LAMBDA * F.relu(bpd - target), None
    else:
        raise ValueError(f"unknown adaptive attack {name!r}")

    run = run_pgd(name, objective, exact, images, labels, levels, ball,
                  steps=settings.steps, alpha=settings.alpha, restarts=settings.restarts,
                  seed=settings.seed, progress=progress,
                  gate=None if not name.startswith("detector") else
                  (lambda q: bits_per_dim(model, q) <= threshold),
                  # uniform noise in the ball costs ~2 bits/dim, which the gate sees: the
                  # detector-aware attack starts from the clean image
                  random_start=name != "detector")
    if name.startswith("detector"):
        with torch.no_grad():
            bpd = bits_per_dim(model, run.adversarial)
        run.passes_gate = (bpd <= threshold).numpy()
    run.summary.update({"t_start": settings.t_start, "t_end": settings.t_end,
                        "passes": settings.passes, "box_softness": settings.box_softness})
    return run


def _cached(cache: Any, name: str, key: dict[str, Any], work: Callable[[], AttackRun]
            ) -> AttackRun:
    """Load an AttackRun from a `evaluation.run.StageCache`, or run and store it."""
    if cache is not None:
        hit = cache.load(name, key)
        if hit is not None:
            meta = hit["__meta__"]
            gate = hit.get("passes_gate")
            return AttackRun(meta["name"], torch.from_numpy(np.asarray(hit["adversarial"])),
                             np.asarray(hit["pred"]), np.asarray(hit["fooled"]),
                             meta["loss_curve"], meta["accuracy_curve"],
                             None if gate is None or gate.size == 0 else np.asarray(gate),
                             meta["summary"])
    run = work()
    if cache is not None:
        arrays = {"adversarial": run.adversarial.numpy(), "pred": run.pred,
                  "fooled": run.fooled,
                  "passes_gate": np.zeros(0) if run.passes_gate is None else run.passes_gate}
        cache.save(name, key, arrays, {"name": run.name, "loss_curve": run.loss_curve,
                                       "accuracy_curve": run.accuracy_curve,
                                       "summary": run.summary})
    return run


def _rate(correct: np.ndarray) -> dict[str, Any]:
    k, n = int(correct.sum()), int(len(correct))
    lo, hi = wilson(k, n)
    return {"n": n, "correct": k, "accuracy": k / n if n else math.nan,
            "ci95": [lo, hi], "ci_method": "Wilson score"}


def _run_on_column(name: str, defence: str, e: int | None, correct: np.ndarray,
                   defended_clean: np.ndarray, exact: Callable[[torch.Tensor], torch.Tensor],
                   model: nn.Module, classifier: nn.Module, images: torch.Tensor,
                   labels: torch.Tensor, levels: int, ball: int, threshold: float | None,
                   settings: SuiteSettings, cache: Any, key: dict[str, Any],
                   log: Callable[[str], None]) -> tuple[AttackRun, dict[str, Any]]:
    """One attack (not cw-bs) against one column, on the survivors (`correct`) when
    --on-survivors asks for it; returns its run over every image and its table entry."""
    y = labels.numpy()
    ck = "none" if defence == "none" else f"{defence}@{e}"
    entry: dict[str, Any] = {}
    on_survivors = name in settings.on_survivors and not (
        name == "square" and settings.square_all)
    index = np.flatnonzero(correct) if on_survivors else np.arange(len(y))
    if on_survivors:
        entry["run_on"] = "survivors of every earlier attack"
        entry["survivors"] = int(len(index))
        if name == "square" and settings.square_n is not None \
                and len(index) > settings.square_n:
            index = index[:settings.square_n]
            entry["run_on"] += f", the first {settings.square_n} of them"
        entry["n_attacked"] = int(len(index))
    log(f"{name} on {len(index)} images vs {ck}")
    sub = torch.from_numpy(index)
    stage = {"stage": f"adaptive-{name}", **key, "ball": ball, "column": ck,
             "settings": ({"queries": settings.queries, "seed": settings.seed}
                          if name == "square" else settings.pgd_key()),
             "images": index.tolist() if on_survivors else "all",
             **({"random_start": False} if name == "detector" else {})}
    if len(sub) == 0:
        part = AttackRun(name, images[:0].clone(), np.zeros(0, dtype=np.int64),
                         np.zeros(0, dtype=bool), summary={"skipped": True})
    elif name == "square":
        part = _cached(cache, f"adaptive-square-eps{ball}-{ck.replace('@', '-e')}",
                       stage, lambda sub=sub, exact=exact: run_square(
                           exact, images[sub], labels[sub], levels, ball,
                           settings.queries, settings.seed))
    else:
        part = _cached(cache, f"adaptive-{name}-eps{ball}-{ck.replace('@', '-e')}",
                       stage, lambda name=name, defence=defence, e=e, sub=sub:
                       attack_column(name, model, classifier, defence, e,
                                     threshold, images[sub], labels[sub], levels,
                                     ball, settings))
    if on_survivors:
        fooled = np.zeros(len(y), dtype=bool)
        fooled[index] = part.fooled
        pred = defended_clean.copy()
        pred[index] = part.pred
        adv = images.clone()
        adv[sub] = part.adversarial
        run = AttackRun(name, adv, pred, fooled, part.loss_curve,
                        part.accuracy_curve, None,
                        {**part.summary, "attacked": index.tolist()})
        entry["fooled_of_attacked"] = int(part.fooled.sum())
        entry.update(_rate(~part.fooled))  # accuracy on the images it attacked
    else:
        run = part
        entry.update(_rate(~run.fooled))
    return run, entry


def _describe_run(run: AttackRun, entry: dict[str, Any], clean_pred: np.ndarray,
                  y: np.ndarray) -> None:
    """Add the run's summary, curves, cost and gate figures to its table entry."""
    entry["summary"] = run.summary
    if run.loss_curve:
        entry["loss_curve"] = run.loss_curve
        entry["accuracy_curve"] = run.accuracy_curve
        per_step = run.summary.get("seconds", 0) / max(1, run.summary.get(
            "forward_passes", 0))
        entry["seconds_per_image_step"] = round(per_step, 5)
    if run.passes_gate is not None:
        entry["passes_gate"] = float(run.passes_gate.mean())
        entry["fooled_and_passes_gate"] = float((run.fooled & run.passes_gate).mean())
        entry["undefended_fooled"] = float((clean_pred != y).mean())


def run_suite(model: nn.Module, classifier: nn.Module, images: torch.Tensor,
              labels: torch.Tensor, levels: int, ball: int,
              columns: list[tuple[str, int | None]], threshold: float | None,
              settings: SuiteSettings, *, prior_correct: dict[str, np.ndarray] | None = None,
              cache: Any = None, key: dict[str, Any] | None = None,
              log: Callable[[str], None] | None = None
              ) -> tuple[dict[str, Any], dict[str, AttackRun]]:
    """Every chosen adaptive attack against every defence column on the same images.

    Columns are (defence, eps_defend) with defence none / purify / adaptive; the column
    key is "none", "purify@E", "adaptive@E". `prior_correct[column]`: images still
    classified correctly under earlier (e.g. oblivious) attacks, folded into the
    per-image worst case and into the choice of Square's survivors. Returns (results,
    runs by "attack|column")."""
    log = log or (lambda _m: None)
    labels = torch.as_tensor(labels, dtype=torch.long)
    y = labels.numpy()
    key = key or {}
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    runs: dict[str, AttackRun] = {}
    out: dict[str, Any] = {"ball": ball, "n": int(len(y)), "settings": settings.as_dict(),
                           "columns": {}}
    with torch.no_grad():
        clean_pred = classifier(images.float() / (levels - 1)).argmax(1).numpy()
    cw_adv = None
    if "cw-bs" in settings.attacks:
        def cw_work() -> AttackRun:
            t0 = time.perf_counter()
            adv, c = cw_binary_search(classifier, images, labels, levels, ball,
                                      steps=settings.cw_steps,
                                      search_steps=settings.cw_search)
            with torch.no_grad():
                pred = classifier(adv.float() / (levels - 1)).argmax(1).numpy()
            return AttackRun("cw-bs", adv, pred, pred != y, summary={
                "steps": settings.cw_steps, "search_steps": settings.cw_search,
                "median_c": float(np.nanmedian(c)) if np.isfinite(c).any() else None,
                "seconds": round(time.perf_counter() - t0, 3)})
        log("cw-bs (oblivious, binary search over c)")
        cw_adv = _cached(cache, f"adaptive-cw-bs-eps{ball}",
                         {"stage": "adaptive-cw-bs", **key, "ball": ball,
                          "steps": settings.cw_steps, "search": settings.cw_search}, cw_work)
    for defence, e in columns:
        ck = "none" if defence == "none" else f"{defence}@{e}"
        exact = exact_pipeline(model, classifier, defence, e, threshold, settings.batch_size)
        with torch.no_grad():
            defended_clean = exact(images.float() / (levels - 1)).argmax(1).numpy()
        col: dict[str, Any] = {"clean": _rate(defended_clean == y), "attacks": {}}
        correct = defended_clean == y
        if prior_correct is not None and ck in prior_correct:
            correct &= prior_correct[ck]
            col["prior"] = _rate(prior_correct[ck])
        for name in settings.attacks:
            if name.startswith("detector") and defence != "adaptive":
                continue
            if name in ("bpda-surrogate", "surrogate-pgd") and defence == "none":
                continue
            entry: dict[str, Any] = {}
            if name == "cw-bs":
                assert cw_adv is not None
                with torch.no_grad():
                    pred = exact(cw_adv.adversarial.float() / (levels - 1)).argmax(1).numpy()
                run = AttackRun("cw-bs", cw_adv.adversarial, pred, pred != y,
                                summary=cw_adv.summary)
                entry.update(_rate(~run.fooled))
            else:
                run, entry = _run_on_column(name, defence, e, correct, defended_clean, exact,
                                            model, classifier, images, labels, levels, ball,
                                            threshold, settings, cache, key, log)
            runs[f"{name}|{ck}"] = run
            _describe_run(run, entry, clean_pred, y)
            col["attacks"][name] = entry
            correct &= ~run.fooled
        col["worst_case"] = _rate(correct)
        col["worst_case"]["attacks"] = list(col["attacks"]) + (
            ["earlier attacks"] if prior_correct is not None and ck in prior_correct else [])
        out["columns"][ck] = col
    return out, runs


def measure_agreement(model: nn.Module, classifier: nn.Module, images: torch.Tensor,
                      columns: list[tuple[str, int | None]], settings: SuiteSettings
                      ) -> dict[str, Any]:
    """Surrogate vs exact purifier per purifying column: from the input (surrogate-pgd's
    forward) at the final temperature, and anchored at the exact output (bpda-surrogate's
    forward) at the final and the starting temperature."""
    from .surrogate import agreement

    out: dict[str, Any] = {}
    for defence, e in columns:
        if defence != "purify":
            continue
        from .purify import purify_fast

        exact = purify_fast(model, images, int(e or 0), settings.batch_size)
        rows = []
        for anchored, temp, passes in ((False, settings.t_end, settings.passes),
                                       (True, settings.t_start, settings.passes),
                                       (True, settings.t_end, settings.passes),
                                       (True, 0.001, settings.passes)):
            a = agreement(model, images, int(e or 0), temp, passes, classifier, exact=exact,
                          batch_size=settings.batch_size, anchored=anchored,
                          box_softness=settings.box_softness)
            rows.append(a.as_dict())
        out[f"purify@{e}"] = rows
    return out


def _square_check(model: nn.Module, classifier: nn.Module, images: torch.Tensor,
                  labels: torch.Tensor, levels: int, ball: int, column: tuple[str, int | None],
                  threshold: float | None, settings: SuiteSettings,
                  runs: dict[str, AttackRun], cache: Any, key: dict[str, Any],
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Square with a quarter of the queries, on the images it attacked, fools no more."""
    defence, e = column
    ck = "none" if defence == "none" else f"{defence}@{e}"
    all_images, all_labels = images, labels
    checks: list[dict[str, Any]] = []
    square = runs.get(f"square|{ck}")
    attacked = (square.summary.get("attacked") or []) if square is not None else []
    if attacked and settings.queries >= 4:
        fewer = settings.queries // 4
        log(f"sanity: square vs {ck} with {fewer} queries on the same {len(attacked)} images")
        idx = torch.tensor(attacked)
        exact = exact_pipeline(model, classifier, defence, e, threshold, settings.batch_size)
        run = _cached(cache, f"adaptive-sanity-square-q{fewer}-{ck.replace('@', '-e')}",
                      {"stage": "adaptive-sanity-square", **key, "ball": ball,
                       "queries": fewer, "images": attacked, "column": ck,
                       "seed": settings.seed},
                      lambda: run_square(exact, all_images[idx], all_labels[idx], levels,
                                         ball, fewer, settings.seed))
        k_few, k_full = int(run.fooled.sum()), int(square.fooled[idx.numpy()].sum())
        checks.append({"name": "more queries never help the defence",
                       "passed": bool(k_full >= k_few - max(1, len(attacked) // 20)),
                       "detail": f"Square fooled {k_few} of {len(attacked)} with {fewer} "
                                 f"queries, {k_full} with {settings.queries} (raw, "
                                 "separate runs)"})
    return checks


def _curve_checks(runs: dict[str, AttackRun], base_run: AttackRun | None,
                  steps: int) -> list[dict[str, Any]]:
    """Gradient steps fool images beyond the start, and every loss rises."""
    checks: list[dict[str, Any]] = []
    if base_run is not None and base_run.accuracy_curve:
        start, end = base_run.accuracy_curve[0], base_run.accuracy_curve[-1]
        checks.append({"name": "gradient steps fool images beyond the random start",
                       "passed": bool(end < start),
                       "detail": f"{100 * start:.1f}% after the random start, "
                                 f"{100 * end:.1f}% after {steps} steps"})
    for name, run in runs.items():
        if name.startswith("detector|") and run.accuracy_curve:
            # a constrained attack from the clean image: its penalised loss may well start
            # at its maximum; what must happen is that it fools images beyond the start
            start, end = run.accuracy_curve[0], run.accuracy_curve[-1]
            checks.append({"name": f"steps fool images beyond the start: {name}",
                           "passed": bool(end < start),
                           "detail": f"{100 * start:.1f}% at the start, {100 * end:.1f}% "
                                     "at the end (fooled and under the gate)"})
            continue
        if not run.loss_curve:
            continue
        first, best = run.loss_curve[0], max(run.loss_curve)
        checks.append({"name": f"loss rises: {name}", "passed": bool(best > first + 1e-4),
                       "detail": f"start {first:.4g}, max {best:.4g}, "
                                 f"end {run.loss_curve[-1]:.4g}"})
    return checks


def sanity_checks(model: nn.Module, classifier: nn.Module, images: torch.Tensor,
                  labels: torch.Tensor, levels: int, ball: int, column: tuple[str, int | None],
                  threshold: float | None, settings: SuiteSettings,
                  runs: dict[str, AttackRun], attack: str = "bpda-surrogate",
                  n: int = 50, multipliers: tuple[int, ...] = (2, 4, 8),
                  cache: Any = None, key: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Tramèr et al. (2020) sanity checks; each is {"name", "passed", "detail"}.

    1. accuracy falls to ~0% (≤ 10%) as eps grows (`attack` at `multipliers` × the ball,
       capped at levels - 1, on the first `n` images), and never rises with eps;
    2. more steps never help the defence: `attack` with a quarter of the steps (a
       separate run, raw numbers) is not stronger than the full run on the same images;
    3. every gradient attack's loss rises over its run.
    A deliberately broken attack (step size 0) fails 1 and 3."""
    log = log or (lambda _m: None)
    key = key or {}
    defence, e = column
    ck = "none" if defence == "none" else f"{defence}@{e}"
    labels = torch.as_tensor(labels, dtype=torch.long)
    all_images, all_labels = images, labels
    images, labels = images[:n], labels[:n]
    m = len(labels)
    checks: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    base_run = runs.get(f"{attack}|{ck}")
    if base_run is not None:
        sweep.append({"ball": ball, "accuracy": float(1 - base_run.fooled[:m].mean())})
    for k in multipliers:
        b = min(levels - 1, ball * k)
        if any(s["ball"] == b for s in sweep):
            continue
        log(f"sanity: {attack} vs {ck} at {b} levels")
        sub = SuiteSettings(**{**settings.as_dict(), "restarts": 1,
                               "steps": max(10, settings.steps // 2)})
        run = _cached(cache, f"adaptive-sanity-{attack}-ball{b}-{ck.replace('@', '-e')}",
                      {"stage": "adaptive-sanity", **key, "ball": b, "n": m,
                       "settings": sub.pgd_key(), "column": ck},
                      lambda b=b, sub=sub: attack_column(attack, model, classifier, defence,
                                                         e, threshold, images, labels,
                                                         levels, b, sub))
        sweep.append({"ball": b, "accuracy": float(1 - run.fooled.mean()),
                      "steps": sub.steps})
    tol = 2 / max(1, m)
    if sweep:
        accs = [s["accuracy"] for s in sweep]
        falls = accs[-1] <= 0.10
        monotone = all(b <= a + tol for a, b in zip(accs, accs[1:], strict=False))
        checks.append({"name": "accuracy falls to ~0% as eps grows",
                       "passed": bool(falls and monotone),
                       "detail": ", ".join(f"{s['ball']} levels: {100 * s['accuracy']:.0f}%"
                                           for s in sweep)
                       + ("" if falls else " — does NOT reach ≤ 10%")
                       + ("" if monotone else " — accuracy ROSE with eps")})
    if base_run is not None and settings.steps >= 4:
        quarter = SuiteSettings(**{**settings.as_dict(), "steps": settings.steps // 4})
        log(f"sanity: {attack} vs {ck} with {quarter.steps} steps")
        run = _cached(cache, f"adaptive-sanity-{attack}-steps{quarter.steps}-"
                      f"{ck.replace('@', '-e')}",
                      {"stage": "adaptive-sanity-steps", **key, "ball": ball, "n": m,
                       "settings": quarter.pgd_key(), "column": ck},
                      lambda: attack_column(attack, model, classifier, defence, e,
                                            threshold, images, labels, levels, ball,
                                            quarter))
        a_q = float(1 - run.fooled.mean())
        a_f = float(1 - base_run.fooled[:m].mean())
        checks.append({"name": "more steps never raise accuracy",
                       "passed": bool(a_f <= a_q + tol),
                       "detail": f"{quarter.steps} steps: {100 * a_q:.0f}%, "
                                 f"{settings.steps} steps: {100 * a_f:.0f}% (raw, separate "
                                 f"runs, first {m} images)"})
    checks += _square_check(model, classifier, all_images, all_labels, levels, ball, column,
                            threshold, settings, runs, cache, key, log)
    checks += _curve_checks(runs, base_run, settings.steps)
    return {"column": ck, "attack": attack, "n": m, "eps_sweep": sweep, "checks": checks,
            "passed": all(c["passed"] for c in checks)}
