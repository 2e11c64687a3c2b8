"""`pixeldefend evaluate`: every attack x eps against every defence, on the same images.

A defence is only as good as the strongest attack that knows about it, so the evaluation
runs the oblivious attacks of `pixeldefend.attacks` (which see the bare classifier) *and*
the adaptive BPDA attack of `pixeldefend.bpda` (which sees classifier∘purifier), and
reports both in one table. Columns are defences: none, PixelDefend purification at each
eps_defend, adaptive PixelDefend (purify only images whose bits/dim exceed the model's
calibrated threshold) at each eps_defend. Detection figures (bits/dim of adversarial
against clean images) come from the same runs.

The package: `plan` (settings, eps lists, columns, every stage's name and cache key),
`run` (the cached, resumable stage runner and each stage's work), `results` (the
document below, the worst case), `report` (summaries; tables and figures in
`pixeldefend.report`), `defences` (the registry: one entry per defence).

Work is split into stages (score clean images, one attack, one purification, one BPDA
run); each stage's arrays go to ``<out>/cache/<stage>.npz`` with a key describing its
inputs (content hashes of the models and images, and every parameter). With
``resume=True`` a stage whose key matches is loaded instead of run, so an interrupted
evaluation continues where it stopped, and changing one option re-runs only what it
affects. Every file is written atomically.

Adaptive PixelDefend purifies exactly the images above the threshold with the same
purifier, so its results are taken from the purification stage (which purifies every
image when the plain defence is evaluated too, else only those above the threshold);
`test_purify` checks that the purified images are identical either way. Stages call
`purify.purify_fast` directly (the bits/dim `purify.purify` would compute first are known
already), and BPDA attacks `bpda.StraightThroughPurifier`, the same computation as
`purify.PurifiedClassifier` at half the cost per step.

results.json (schema ``pixeldefend.evaluate/1``), every number in the report:

- ``schema``, ``tool``, ``version``, ``created`` (UTC ISO time)
- ``config``: ``model``, ``classifier``, ``data``, ``n``, ``levels``, ``attacks`` (list),
  ``eps`` (list of ``{"text", "fraction", "levels", "ball"}``; ``ball`` = whole pixel levels
  an attack may move), ``eps_defend`` (levels), ``defences``, ``adaptive_attack``
  (``"bpda"`` or null), ``bpda`` (``{"steps", "n", "eot", "eps" (balls it ran at),
  "alpha" ({ball: step size as a fraction of [0, 1]}), "random_start"}``),
  ``seed``, ``batch_size``, ``purify_batch``, ``device``
- ``columns``: list of ``{"key", "defence", "eps_defend", "label"}``; ``key`` is ``"none"``,
  ``"purify@E"`` or ``"adaptive@E"`` and indexes every ``accuracy`` dict below
- ``threshold``: ``{"calibrated", "calibrated_fpr", "calibration_n", "calibration_data",
  "fpr5_clean", "fpr5_source"}``: bits/dim thresholds (calibrated: the model's own
  calibration set; fpr5_clean: 95th percentile of the evaluated clean images)
- ``clean``: ``{"n", "mean_bpd", "accuracy": {column: fraction}, "flagged_calibrated"}``
- ``rows``: one per attack x eps plus one per BPDA eps: ``{"attack", "kind"
  ("oblivious"|"adaptive"), "eps" (index into config.eps), "eps_text", "n", "accuracy":
  {column: fraction}, "clean_accuracy": {column: fraction on the same n images},
  "attack_success": fraction of correctly classified clean images fooled (no defence),
  "summary": the attack's own summary (per column for BPDA)}``
- ``strongest``: per eps ``{"eps", "eps_text", "accuracy": {column: min over oblivious
  attacks}, "attack": {column: which attack}}``
- ``worst_case``: per eps ``{"eps", "eps_text", "n", "accuracy": {column: fraction of
  images classified correctly under every attack listed}, "attacks"}``; computed on the
  BPDA images (the first ``config.bpda.n``) when BPDA ran, so it includes BPDA
- ``detection``: per attack x eps (and BPDA) ``{"attack", "kind", "eps", "eps_text", "n",
  "mean_bpd_clean", "mean_bpd_adv", "auroc", "auroc_fooled", "n_fooled", "tpr_calibrated",
  "tpr_fpr5", "fpr_calibrated"}``; AUROC of bits/dim (adversarial = positive) by
  scikit-learn; auroc_fooled uses only adversarial images that fool the bare classifier
- ``adaptive``: per eps the suite of `pixeldefend.adaptive` (``--adaptive-attack`` other
  than bpda): ``{"eps", "eps_text", "ball", "n", "settings", "columns": {column:
  {"clean", "prior", "attacks": {attack: {"n", "correct", "accuracy", "ci95",
  "ci_method", "summary", ...}}, "worst_case"}}, "agreement", "sanity"}``; the
  ``worst_case`` entry of that eps then covers these attacks too (and gains ``ci95``)
- ``timing``: ``{"seconds_total", "stages": {stage: seconds}}`` (cached stages keep the
  seconds they took when they ran)
- ``notes``: the plain-words caveats printed above the table
- ``figures``: file names of the PNGs written next to the report
"""

from __future__ import annotations

from ..progress import EvalProgress
from .defences import DEFENCES, DefenceSpec, column_key, column_label
from .plan import (
    ADAPTIVE_ATTACKS,
    COST,
    DEFAULT_EPS,
    DEFAULT_EPS_DEFEND,
    SCHEMA,
    EvaluateSettings,
    Plan,
    Stage,
    default_eps_defend_list,
    default_eps_list,
    make_plan,
    parse_list,
)
from .results import OBLIVIOUS_NOTE, Evaluation
from .run import StageCache, module_digest, run_evaluation, tensor_digest

__all__ = ["ADAPTIVE_ATTACKS", "COST", "DEFAULT_EPS", "DEFAULT_EPS_DEFEND", "DEFENCES",
           "OBLIVIOUS_NOTE", "SCHEMA", "DefenceSpec", "EvalProgress", "EvaluateSettings",
           "Evaluation", "Plan", "Stage", "StageCache", "column_key", "column_label",
           "default_eps_defend_list", "default_eps_list", "make_plan", "module_digest",
           "parse_list", "run_evaluation", "tensor_digest"]
