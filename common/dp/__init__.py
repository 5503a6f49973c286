"""The one differential-privacy mechanism of privadapt, its noise source and its accounting.

Every path (DPAgg-TI releases, DP-FedAvg rounds, simulations) bounds, sums, noises and
accounts through this package; nothing else in the code base draws DP noise or computes an
epsilon. Whether an attempt would pass a target is asked of :class:`BudgetCheck` alone
(:mod:`common.dp.budget`); the run's plan is :mod:`common.dp.plan`.
"""

from common.dp.accounting import ACCOUNTANTS, calibrate_noise_multiplier, epsilon
from common.dp.budget import BudgetCheck
from common.dp.ledger import PrivacyLedger
from common.dp.mechanism import GaussianSumMechanism, PrivacyEvent
from common.dp.noise import NoiseSource

__all__ = [
    "ACCOUNTANTS",
    "BudgetCheck",
    "GaussianSumMechanism",
    "NoiseSource",
    "PrivacyEvent",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "epsilon",
]
