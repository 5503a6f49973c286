"""Evaluation of privadapt's releases: membership inference, the DP audit, utility, reports.

Contract changes and additions (A -> B), all backward compatible:
- attacks.json also carries top-level ``"delta"`` (the run's target delta, used by every
  record's epsilon heuristic) and ``"model"`` (the base model folder). A record that is
  not applicable has ``applicable: false``, a ``reason``, and null figures (auc, auc_ci,
  balanced_accuracy, tpr_at_fpr, epsilon_heuristic, roc). ``details.epsilon.point_estimate``
  may be ``Infinity`` in the JSON (zero false positives at a positive TPR).
- (B -> C, not backward compatible) an attack record's ``epsilon_lower_bound`` is renamed
  ``epsilon_heuristic``: computed from one run's scores, whose trials are not independent, it
  is not a valid lower bound (:mod:`metrics`). The report still reads the old name. The
  valid bound is audit.json's ``epsilon_lower_bound`` (the canary audit, unchanged).
- ``details`` of threshold attacks hold ``timestep`` and ``auc_by_timestep``; h' is scored on
  the held-out (te) splits only, so its ``details.members`` / ``non_members`` are smaller.
- audit.json also carries ``"details"`` (rounds, sample rate, noise multiplier, clip norm,
  guesses in/out, the events the releases emitted) and, for a run, ``"run"``.
- ``run_attacks`` takes keyword extras: draws, timesteps, proxy (ProxySettings),
  lira_shadows, device. ``attacks=None`` runs loss, loss-calibrated, pia, secmi-stat,
  proxy-h; "lira" is opt-in (it trains shadow adapters).
- Utility (B): ``scores.encode(pipe, pixels, prompts)`` then
  ``scores.mean_denoising_loss(unet, scheduler, encoded, timesteps, draws=, seed=)``; the
  same seed gives the same noise for the base and the adapted model.

Modules: :mod:`metrics` (ROC, AUC, TPR at FPR, the epsilon heuristic from rates), :mod:`scores`
(per-image denoising errors), :mod:`queries` (PIA, SecMI), :mod:`proxy` (h'), :mod:`lira`,
:mod:`site_inference`, :mod:`attacks` (``run_attacks`` -> attacks.json), :mod:`splits` (a
run's member / non-member sets), :mod:`target` (a run's base and adapted pipelines),
:mod:`one_run` (Steinke et al.'s bound), :mod:`audit` (``run_audit`` -> audit.json),
:mod:`fixtures` (known-answer adapters for tests).
"""
