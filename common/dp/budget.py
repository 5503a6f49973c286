"""Would an attempt take a privacy unit past its target? One answer for every place that asks.

The server asks it when it plans a run (:mod:`common.dp.plan`: the whole plan against
``target-epsilon``) and before every round attempt (:meth:`server.strategy_base.LedgerStrategy.check_budget`);
a site asks it before a DP-SGD round (:func:`client.site_accountant.begin_round`) and when it
checks a run's plan against its policy (:func:`client.policy.check_round`: the run alone;
:func:`client.policy.reserve_run`: the run after every run in its lifetime ledger).

What an attempt costs is the epsilon of the events already ``spent`` composed with the events
it ``planned`` (spent first, then planned), by one accountant at one delta
(:func:`common.dp.accounting.epsilon`); it may not run when that epsilon is strictly above the
target (no tolerance). A target that is not finite (inf: not enforced) or an attempt that plans
nothing is never over, and its epsilon is not computed unless asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

from common.dp.accounting import AccountantName, epsilon
from common.dp.mechanism import PrivacyEvent


@dataclass(frozen=True)
class BudgetCheck:
    """What ``planned`` costs after ``spent`` (:attr:`epsilon`) and whether it passes
    ``target_epsilon`` (:attr:`over`), at ``delta`` with ``accountant``."""

    spent: Sequence[PrivacyEvent]
    planned: Sequence[PrivacyEvent]
    target_epsilon: float
    delta: float
    accountant: AccountantName = "prv"

    def __post_init__(self) -> None:
        object.__setattr__(self, "spent", tuple(self.spent))
        object.__setattr__(self, "planned", tuple(self.planned))

    @property
    def enforced(self) -> bool:
        """Whether there is anything to check: a finite target and something planned."""
        return bool(self.planned) and math.isfinite(self.target_epsilon)

    @cached_property
    def epsilon(self) -> float:
        """The epsilon of ``spent`` and then ``planned`` composed (inf if one carries no noise)."""
        return epsilon([*self.spent, *self.planned], self.delta, self.accountant)

    @property
    def over(self) -> bool:
        """Whether the attempt would take the unit strictly above its target: it must not run."""
        return self.enforced and self.epsilon > self.target_epsilon
