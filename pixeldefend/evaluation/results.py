"""The results document (schema ``pixeldefend.evaluate/1``) from the stages' arrays.

Accuracy per column comes from the defence registry (`DefenceSpec.combine`), the worst
case counts an image only if it survives every attack at that eps, and detection is the
AUROC of bits/dim (adversarial = positive). The schema is documented in
`pixeldefend.evaluation`.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import __version__
from .defences import DEFENCES, column_key, column_label
from .plan import SCHEMA, set_name

if TYPE_CHECKING:
    from .plan import Plan

OBLIVIOUS_NOTE = (
    "A defence evaluated only with oblivious attacks is not evaluated. The oblivious "
    "attacks below (rand, fgsm, bim, pgd, cw, deepfool) are computed against the bare "
    "classifier and do not know the purifier exists; only the adaptive rows (BPDA: "
    "projected gradient descent through classifier∘purifier, with the purifier taken "
    "as the identity on the backward pass) say how the defence fares against an "
    "attacker who knows it.")


@dataclass
class Evaluation:
    """The results document plus the arrays the figures are drawn from."""

    results: dict[str, Any]
    clean: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor
    levels: int
    clean_pred: np.ndarray
    clean_bpd: np.ndarray
    adversarial: dict[str, dict[str, Any]] = field(default_factory=dict)  # set -> arrays
    purified: dict[str, dict[str, Any]] = field(default_factory=dict)  # set|e -> arrays
    bpda: dict[str, dict[str, Any]] = field(default_factory=dict)  # eps|column -> arrays
    suite: dict[str, dict[str, Any]] = field(default_factory=dict)  # eps -> adaptive runs
    threshold: float | None = None  # the calibrated bits/dim threshold (gated defences)

    def image_set(self, name: str) -> dict[str, Any]:
        """``clean`` or an adversarial set: images, pred, bpd."""
        if name == "clean":
            return {"images": self.clean, "pred": self.clean_pred, "bpd": self.clean_bpd}
        return self.adversarial[name]

    def column_pred(self, name: str, defence: str, eps_defend: int | None) -> np.ndarray:
        """The defended predictions of image set `name` in one column."""
        src = self.image_set(name)
        spec = DEFENCES[defence]
        purified = self.purified[f"{name}|{eps_defend}"]["pred"] if spec.purifies else \
            src["pred"]
        flagged = src["bpd"] > self.threshold if self.threshold is not None else \
            np.zeros(len(src["pred"]), dtype=bool)
        return spec.combine(src["pred"], purified, flagged)

    def survivors(self, plan: Plan, eps_index: int, defence: str, eps_defend: int | None,
                  bpda_rows: list[dict[str, Any]], m: int) -> np.ndarray:
        """Which of the first `m` images every attack at that eps left correct (oblivious
        ones, and BPDA when it ran there) in one column."""
        y = self.labels.numpy()[:m]
        b = plan.budgets[eps_index][1]
        ok = np.ones(m, dtype=bool)
        for a in plan.settings.attacks:
            ok &= self.column_pred(set_name(a, b), defence, eps_defend)[:m] == y
        for br in bpda_rows:
            if br["eps_index"] == eps_index:
                ok &= np.asarray(br["cols"][column_key(defence, eps_defend)]["pred"]) == y
        return ok


def _auroc(clean: np.ndarray, adv: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score  # lazy: importing it cost every command 1.3 s

    if len(clean) == 0 or len(adv) == 0:
        return None
    y = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    return float(roc_auc_score(y, np.r_[clean, adv]))


def _mean(a: np.ndarray) -> float | None:
    return float(np.mean(a)) if len(a) else None


def _acc(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(pred == labels)) if len(labels) else math.nan


def _share(mask: np.ndarray | None) -> float | None:
    return None if mask is None else float(np.mean(mask))


def _config(plan: Plan, sources: dict[str, str] | None, device: str) -> dict[str, Any]:
    s = plan.settings
    return {
        **(sources or {}),
        "n": plan.n,
        "levels": plan.levels,
        "attacks": list(s.attacks),
        "eps": [{"text": t, "fraction": b.fraction, "levels": b.levels, "ball": b.ball}
                for t, b in plan.budgets],
        "eps_defend": plan.eps_defend,
        "defences": list(s.defences),
        "adaptive_attack": s.adaptive_attack,
        "bpda": None if "bpda" not in s.adaptive_names else {
            "steps": s.bpda_steps, "n": plan.bpda_n, "eot": s.eot,
            "eps": sorted(plan.bpda_balls),
            "alpha": {str(ball): plan.alpha_of[ball] for ball in sorted(plan.bpda_balls)},
            "random_start": True},
        "seed": s.seed,
        "batch_size": s.batch_size,
        "purify_batch": s.purify_batch,
        "device": device,
        "threads": torch.get_num_threads(),
    }


def _threshold(cal: Any, threshold: float | None, fpr5: float) -> dict[str, Any]:
    return {
        "calibrated": threshold,
        "calibrated_fpr": None if cal is None else cal.fpr,
        "calibration_n": None if cal is None else cal.n,
        "calibration_data": None if cal is None else (cal.data or None),
        "fpr5_clean": fpr5,
        "fpr5_source": "95th percentile of the bits/dim of the evaluated clean images",
    }


@dataclass
class _Detector:
    """Detection rows: bits/dim of adversarial against clean images."""

    threshold: float | None
    fpr5: float

    def row(self, attack: str, kind: str, bi: int, text: str, adv_bpd: np.ndarray,
            adv_pred: np.ndarray, ref_bpd: np.ndarray, ref_y: np.ndarray) -> dict[str, Any]:
        fooled = adv_pred != ref_y
        thr = self.threshold
        return {
            "attack": attack, "kind": kind, "eps": bi, "eps_text": text, "n": len(adv_bpd),
            "mean_bpd_clean": _mean(ref_bpd), "mean_bpd_adv": _mean(adv_bpd),
            "auroc": _auroc(ref_bpd, adv_bpd),
            "auroc_fooled": _auroc(ref_bpd, adv_bpd[fooled]) if fooled.any() else None,
            "n_fooled": int(fooled.sum()),
            "tpr_calibrated": None if thr is None else _share(adv_bpd > thr),
            "tpr_fpr5": float(np.mean(adv_bpd > self.fpr5)),
            "fpr_calibrated": None if thr is None else _share(ref_bpd > thr),
        }


def _oblivious_rows(ev: Evaluation, plan: Plan, bi: int, text: str, clean_acc: dict,
                    det: _Detector, detection: list) -> list[dict[str, Any]]:
    """One row per oblivious attack at eps `bi` (and its detection row)."""
    y = ev.labels.numpy()
    correct_clean = ev.clean_pred == y
    b = plan.budgets[bi][1]
    rows = []
    for a in plan.settings.attacks:
        adv = ev.adversarial[set_name(a, b)]
        acc = {column_key(d, e): _acc(ev.column_pred(set_name(a, b), d, e), y)
               for d, e in plan.columns}
        fooled = correct_clean & (adv["pred"] != y)
        rows.append({"attack": a, "kind": "oblivious", "eps": bi, "eps_text": text,
                     "n": plan.n, "accuracy": acc, "clean_accuracy": dict(clean_acc),
                     "attack_success": float(fooled.sum() / max(1, correct_clean.sum())),
                     "summary": adv["summary"]})
        detection.append(det.row(a, "oblivious", bi, text, adv["bpd"], adv["pred"],
                                 ev.clean_bpd, y))
    return rows


def _bpda_row(ev: Evaluation, plan: Plan, br: dict[str, Any], det: _Detector,
              detection: list) -> dict[str, Any]:
    """The BPDA row of one eps (and the detection of the images it made against the
    first purifying column)."""
    m, bi, text = plan.bpda_n, br["eps_index"], br["text"]
    y = ev.labels.numpy()[:m]
    keys = plan.column_keys
    correct_clean = ev.clean_pred[:m] == y
    undefended = np.asarray(br["cols"]["none"]["undefended_pred"])
    fooled = correct_clean & (undefended != y)
    target = next((k for k in keys if k != "none"), "none")
    col = br["cols"][target]
    detection.append(det.row(f"bpda vs {target}", "adaptive", bi, text,
                             np.asarray(col["bpd"]), np.asarray(col["undefended_pred"]),
                             ev.clean_bpd[:m], y))
    return {"attack": "bpda", "kind": "adaptive", "eps": bi, "eps_text": text, "n": m,
            "accuracy": {k: _acc(np.asarray(br["cols"][k]["pred"]), y) for k in keys},
            "clean_accuracy": {column_key(d, e): _acc(ev.column_pred("clean", d, e)[:m], y)
                               for d, e in plan.columns},
            "attack_success": float(fooled.sum() / max(1, correct_clean.sum())),
            "summary": {k: br["cols"][k]["__meta__"]["summary"] for k in keys}}


def _strongest(rows: list[dict[str, Any]], keys: list[str], bi: int, text: str
               ) -> dict[str, Any]:
    best = {k: min(rows, key=lambda r, k=k: r["accuracy"][k]) for k in keys}
    return {"eps": bi, "eps_text": text,
            "accuracy": {k: r["accuracy"][k] for k, r in best.items()},
            "attack": {k: r["attack"] for k, r in best.items()}}


def _worst_case(ev: Evaluation, plan: Plan, bi: int, text: str,
                bpda_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The most honest figure: an image counts only if it survives every attack."""
    has_bpda = any(br["eps_index"] == bi for br in bpda_rows)
    m = plan.bpda_n if has_bpda else plan.n
    return {"eps": bi, "eps_text": text, "n": m,
            "accuracy": {column_key(d, e): float(ev.survivors(plan, bi, d, e, bpda_rows,
                                                              m).mean())
                         for d, e in plan.columns},
            "attacks": list(plan.settings.attacks) + (["bpda"] if has_bpda else [])}


def _add_suite(worst_case: list[dict[str, Any]], suite: list[dict[str, Any]],
               plan: Plan) -> None:
    """The worst case then covers every attack of the adaptive suite too."""
    for sr in suite:
        wc = next((w for w in worst_case if w["eps"] == sr["eps"]), None)
        if wc is None:
            wc = {"eps": sr["eps"], "eps_text": sr["eps_text"], "n": plan.bpda_n,
                  "accuracy": {}, "attacks": list(plan.settings.attacks)}
            worst_case.append(wc)
        wc["n"] = plan.bpda_n
        wc["accuracy"].update({k: c["worst_case"]["accuracy"]
                               for k, c in sr["columns"].items()})
        wc["ci95"] = {k: c["worst_case"]["ci95"] for k, c in sr["columns"].items()}
        wc["attacks"] = list(dict.fromkeys(wc["attacks"] + list(plan.settings.suite.attacks)))


def _notes(plan: Plan, has_worst_case: bool) -> list[str]:
    """The plain-words caveats printed above the table."""
    s = plan.settings
    notes = [OBLIVIOUS_NOTE]
    if not s.adaptive_names:
        notes.append("No adaptive attack was run (adaptive_attack none): this table does "
                     "not evaluate the defence.")
    else:
        notes.append(
            f"BPDA: {s.bpda_steps} steps of PGD, quantised to {plan.levels} levels and "
            f"clipped to the eps ball like every other attack, on the first {plan.bpda_n} "
            f"of the {plan.n} images, one run per defence column (the none column is plain "
            "PGD). Purification and the classifier are deterministic, so EOT is not needed"
            + (" (1 sample)." if s.eot == 1 else
               f"; it was run with {s.eot} samples anyway."))
    if has_worst_case:
        notes.append("'every attack, per image': the images that no attack at that eps "
                     "(each oblivious one, and BPDA when it ran: then on the BPDA images "
                     "only) managed to misclassify; the strongest attack per image.")
    if any(a in ("cw", "deepfool") for a in s.attacks):
        notes.append("CW and DeepFool minimise an L2 norm; their images are clipped to the "
                     "L-infinity eps ball, as in the PixelDefend paper.")
    notes.append("Detection: TPR at the calibrated threshold uses the model's own clean "
                 "calibration set; TPR at 5% FPR uses the 95th percentile of the evaluated "
                 "clean images' bits/dim.")
    return notes


def assemble_results(ev: Evaluation, plan: Plan, bpda_rows: list[dict[str, Any]],
                     suite: list[dict[str, Any]], cal: Any, sources: dict[str, str] | None,
                     device: str) -> dict[str, Any]:
    """results.json without ``timing`` and ``figures`` (the runner adds them)."""
    y = ev.labels.numpy()
    fpr5 = float(np.quantile(ev.clean_bpd, 0.95))
    thr = plan.threshold
    clean_acc = {column_key(d, e): _acc(ev.column_pred("clean", d, e), y)
                 for d, e in plan.columns}
    results: dict[str, Any] = {
        "schema": SCHEMA, "tool": "pixeldefend", "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": _config(plan, sources, device),
        "columns": [{"key": column_key(d, e), "defence": d, "eps_defend": e,
                     "label": column_label(d, e)} for d, e in plan.columns],
        "threshold": _threshold(cal, thr, fpr5),
        "clean": {"n": plan.n, "mean_bpd": _mean(ev.clean_bpd), "accuracy": clean_acc,
                  "flagged_calibrated": None if thr is None else _share(ev.clean_bpd > thr)},
    }
    det = _Detector(thr, fpr5)
    rows: list[dict[str, Any]] = []
    detection: list[dict[str, Any]] = []
    strongest: list[dict[str, Any]] = []
    worst_case: list[dict[str, Any]] = []
    for bi, (text, _) in enumerate(plan.budgets):
        eps_rows = _oblivious_rows(ev, plan, bi, text, clean_acc, det, detection)
        rows += eps_rows
        if eps_rows:
            strongest.append(_strongest(eps_rows, plan.column_keys, bi, text))
        rows += [_bpda_row(ev, plan, br, det, detection) for br in bpda_rows
                 if br["eps_index"] == bi]
        if eps_rows or any(br["eps_index"] == bi for br in bpda_rows):
            worst_case.append(_worst_case(ev, plan, bi, text, bpda_rows))
    _add_suite(worst_case, suite, plan)
    results.update({"adaptive": suite, "rows": rows, "worst_case": worst_case,
                    "strongest": strongest, "detection": detection,
                    "notes": _notes(plan, bool(worst_case))})
    return results
