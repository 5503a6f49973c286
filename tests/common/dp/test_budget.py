"""Tests of common/dp/budget.py: the one answer to "would this attempt pass the target"."""

from __future__ import annotations

import math

import pytest

from common.dp import BudgetCheck, PrivacyEvent, epsilon

DELTA = 1e-5
SPENT = [PrivacyEvent.release(1.0, 0.5, "record", "release 1"), PrivacyEvent.release(1.0, 0.5, "record", "release 2")]
NEXT = PrivacyEvent.release(1.0, 0.5, "record", "release 3")


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_cost_is_the_spent_and_then_the_planned_events_composed(accountant):
    check = BudgetCheck(SPENT, [NEXT], 10.0, DELTA, accountant)
    assert check.epsilon == epsilon(SPENT + [NEXT], DELTA, accountant)
    assert check.spent == tuple(SPENT) and check.planned == (NEXT,)


def test_over_is_strictly_above_the_target():
    eps = BudgetCheck(SPENT, [NEXT], math.inf, DELTA).epsilon
    assert BudgetCheck(SPENT, [NEXT], eps, DELTA).over is False  # at the target: may run
    assert BudgetCheck(SPENT, [NEXT], math.nextafter(eps, 0.0), DELTA).over is True


def test_an_infinite_target_or_nothing_planned_is_never_over_and_computes_nothing(monkeypatch):
    import common.dp.budget as budget

    monkeypatch.setattr(budget, "epsilon", lambda *a: pytest.fail("no epsilon should be computed"))
    assert not BudgetCheck(SPENT, [NEXT], math.inf, DELTA).over
    assert not BudgetCheck(SPENT, [], 0.01, DELTA).over  # the lifetime ledger alone is not refused
    assert not BudgetCheck(SPENT, [PrivacyEvent.release(0.0, 1.0, "record")], math.inf, DELTA).enforced


def test_no_noise_costs_infinity():
    check = BudgetCheck((), [PrivacyEvent.release(0.0, 1.0, "site")], 1.0, DELTA)
    assert math.isinf(check.epsilon) and check.over
