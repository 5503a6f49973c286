"""Evaluation of privadapt's releases: membership inference, the DP audit, utility, reports.

Contract changes (A -> B): none yet.

Modules: :mod:`metrics` (ROC, AUC, TPR at FPR, epsilon from rates), :mod:`scores`
(per-image denoising errors), :mod:`attacks` (``run_attacks`` -> attacks.json),
:mod:`splits` (a run's member / non-member sets), :mod:`audit` (``run_audit`` -> audit.json).
"""
