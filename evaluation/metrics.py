"""Membership-inference metrics: ROC, AUC with a bootstrap CI, balanced accuracy, TPR at a
fixed FPR with Clopper-Pearson intervals, and an epsilon HEURISTIC from an attack's rates.

Convention: a HIGHER score means "more likely a member"; labels are 1 (member), 0 (non-member).

Reporting follows Carlini et al., "Membership Inference Attacks From First Principles"
(IEEE S&P 2022): the whole ROC curve (log-log), and the TPR at low FPR rather than accuracy.

The epsilon heuristic uses the hypothesis-testing view of DP (Kairouz, Oh, Viswanath 2015):
an (eps, delta)-DP mechanism admits no test with TPR > e^eps * FPR + delta, nor with
1 - FPR > e^eps * (1 - TPR) + delta, with the TPR at its lower and the FPR at its upper
Clopper-Pearson limit as in Nasr et al., "Tight Auditing of Differentially Private Machine
Learning" (USENIX Security 2023). It is NOT a valid lower bound on epsilon here: those
confidence limits assume independent trials, i.e. one training run per member / non-member
decision, while all the scores come from ONE trained model (the members trained together, so
the decisions are correlated). It is a heuristic for comparing attacks and runs. The
statistically valid one-run bound is the canary audit (:mod:`evaluation.audit`,
:mod:`evaluation.one_run`; Steinke, Nasr, Jagielski 2023), whose guesses are
independent by construction.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

FPR_TARGETS = (0.01, 0.001)


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    if not np.isfinite(s).all():
        raise ValueError("membership scores must be finite (got NaN or infinity)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (non-member) or 1 (member)")
    y = y.astype(np.int64)
    if y.sum() == 0 or y.sum() == y.size:
        raise ValueError(f"need at least one member and one non-member, got {int(y.sum())} and {int(y.size - y.sum())}")
    return s, y


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of "member iff score >= threshold", from (0, 0) to (1, 1).

    Tied scores form one point (no interpolation inside a tie)."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (y.size - y.sum())]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def auc(scores, labels) -> float:
    """Area under the ROC curve = P[score(member) > score(non-member)] + P[tie] / 2
    (the Mann-Whitney statistic, with average ranks for ties)."""
    s, y = _check(scores, labels)
    ranks = stats.rankdata(s)
    n1, n0 = int(y.sum()), int(y.size - y.sum())
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auc_bootstrap_ci(scores, labels, *, level: float = 0.95, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC, resampling members and non-members separately."""
    s, y = _check(scores, labels)
    members, others = s[y == 1], s[y == 0]
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    labels_b = np.r_[np.ones(members.size), np.zeros(others.size)]
    for b in range(resamples):
        sample = np.r_[rng.choice(members, members.size), rng.choice(others, others.size)]
        values[b] = auc(sample, labels_b)
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def balanced_accuracy(scores, labels) -> float:
    """Best (TPR + TNR) / 2 over all thresholds (the attack's threshold chosen in hindsight)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.max((tpr + 1 - fpr) / 2))


def clopper_pearson_limits(successes, trials: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided binomial confidence limits (Clopper and Pearson 1934), vectorised
    over an array of success counts out of the same number of trials."""
    k = np.asarray(successes, dtype=np.float64)
    if trials < 1 or (k < 0).any() or (k > trials).any():
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    alpha = 1 - level
    with np.errstate(invalid="ignore"):
        lo = np.where(k == 0, 0.0, stats.beta.ppf(alpha / 2, np.maximum(k, 1), trials - k + 1))
        hi = np.where(k == trials, 1.0, stats.beta.ppf(1 - alpha / 2, k + 1, np.maximum(trials - k, 1)))
    return lo, hi


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval (Clopper and Pearson 1934)."""
    lo, hi = clopper_pearson_limits(successes, trials, level)
    return float(lo), float(hi)


def tpr_at_fpr(scores, labels, target: float, *, level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """The highest TPR at an ROC point with FPR <= ``target``, and its Clopper-Pearson CI.

    With n non-members, FPR <= target allows floor(target * n) false positives: below 1/n
    that is zero, which is what such a figure means on a small sample."""
    s, y = _check(scores, labels)
    fpr, tpr, _ = roc_curve(s, y)
    best = float(tpr[fpr <= target + 1e-12].max())
    members = int(y.sum())
    return best, clopper_pearson(int(round(best * members)), members, level)


def epsilon_from_rates(tpr: float, fpr: float, delta: float) -> float:
    """The smallest epsilon an (eps, delta)-DP mechanism needs to allow a test with these
    rates: max(log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR)), 0)."""
    bounds = [0.0]
    for num, den in ((tpr - delta, fpr), (1 - fpr - delta, 1 - tpr)):
        if num > 0:
            bounds.append(math.inf if den <= 0 else math.log(num / den))
    return max(bounds)


def epsilon_heuristic(scores, labels, delta: float, *, level: float = 0.95) -> tuple[float, dict]:
    """An epsilon HEURISTIC (not a bound: see the module docstring) from every threshold of
    the ROC, with TPR at its lower and FPR at its upper Clopper-Pearson limit (each one-sided
    at ``level``), and the point estimate (the same formula on the observed rates).

    The threshold is chosen in hindsight, so each of the k ROC points is tested at level
    1 - (1 - ``level``) / k (Bonferroni). Were the trials independent (one training run per
    decision), the first value would be a lower bound at ``level`` for all thresholds at
    once; the scores of one run are not independent, so it is not. Returns (value, details)."""
    s, y = _check(scores, labels)
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    fpr, tpr, _ = roc_curve(s, y)
    n1, n0 = int(y.sum()), int(y.size - y.sum())
    one_sided = 1 - (1 - level) / (2 * fpr.size)  # Bonferroni over thresholds and the two tests
    two_sided = 2 * one_sided - 1  # each limit used is one-sided at `one_sided`
    t_lo, t_hi = clopper_pearson_limits(np.round(tpr * n1), n1, two_sided)
    f_lo, f_hi = clopper_pearson_limits(np.round(fpr * n0), n0, two_sided)
    best, point, at = 0.0, 0.0, (0.0, 0.0)
    for i, (f, t) in enumerate(zip(fpr, tpr)):
        # the test "member above the threshold", and the reversed one: TPR' = 1 - TPR, FPR' = 1 - FPR
        eps = max(epsilon_from_rates(t_lo[i], f_hi[i], delta), epsilon_from_rates(1 - t_hi[i], 1 - f_lo[i], delta))
        if eps > best:
            best, at = eps, (float(f), float(t))
        point = max(point, epsilon_from_rates(t, f, delta))
    return best, {"delta": delta, "confidence": level, "at_fpr_tpr": list(at), "point_estimate": point,
                  "valid_bound": False}


def summarize(name: str, scores, labels, *, delta: float, details: dict | None = None, seed: int = 0,
              resamples: int = 1000) -> dict:
    """The attacks.json record of one applicable attack: AUC with its bootstrap CI, balanced
    accuracy, TPR at 1% and 0.1% FPR with CIs, the epsilon heuristic (not a bound) and the ROC."""
    s, y = _check(scores, labels)
    fpr, tpr, _ = roc_curve(s, y)
    eps, eps_details = epsilon_heuristic(s, y, delta)
    rates = {}
    for target in FPR_TARGETS:
        value, ci = tpr_at_fpr(s, y, target)
        rates[str(target)] = {"tpr": value, "ci": list(ci)}
    return {
        "name": name, "applicable": True, "reason": None,
        "auc": auc(s, y), "auc_ci": list(auc_bootstrap_ci(s, y, seed=seed, resamples=resamples)),
        "balanced_accuracy": balanced_accuracy(s, y), "tpr_at_fpr": rates,
        "epsilon_heuristic": eps, "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "details": {**(details or {}), "epsilon": eps_details, "members": int(y.sum()),
                    "non_members": int(y.size - y.sum())},
    }


def not_applicable(name: str, reason: str) -> dict:
    """The attacks.json record of an attack that cannot run on this adapter, with the reason."""
    return {"name": name, "applicable": False, "reason": reason, "auc": None, "auc_ci": None,
            "balanced_accuracy": None, "tpr_at_fpr": None, "epsilon_heuristic": None, "roc": None, "details": {}}
