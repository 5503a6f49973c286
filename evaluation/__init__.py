"""Evaluation of finished runs: membership inference, the DP audit, utility, reports.

Offline analysis on top of the apps (it loads a run's outputs and the base model; neither app
imports it, and it is not in the app bundle). Modules: :mod:`metrics` (ROC, AUC, TPR at FPR,
the epsilon heuristic from rates), :mod:`scores` (per-image denoising errors), :mod:`queries`
(PIA, SecMI), :mod:`proxy` (SMP-LoRA's h'), :mod:`lira`, :mod:`site_inference`,
:mod:`attacks` (``run_attacks`` -> attacks.json), :mod:`splits` (a run's member and
non-member sets), :mod:`target` (a run's base and adapted pipelines), :mod:`one_run`
(Steinke, Nasr, Jagielski 2023's bound), :mod:`audit` (``run_audit`` -> audit.json),
:mod:`utility` (held-out loss, KID, style share), :mod:`features` (the style classifier),
:mod:`report`, :mod:`sweep_report`, :mod:`plots`, :mod:`grid` (the demo's comparison figure),
:mod:`epsilon_curve`, :mod:`fixtures` (known-answer adapters for tests).
"""
