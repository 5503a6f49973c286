"""The one differential-privacy mechanism of privadapt, its noise source and its accounting.

Every path (DPAgg-TI releases, DP-FedAvg rounds, simulations) bounds, sums, noises and
accounts through this package; nothing else in the code base draws DP noise or computes an
epsilon.
"""

from common.dp.accounting import ACCOUNTANTS, calibrate_noise_multiplier, epsilon
from common.dp.ledger import PrivacyLedger
from common.dp.mechanism import GaussianSumMechanism, PrivacyEvent
from common.dp.noise import NoiseSource

__all__ = [
    "ACCOUNTANTS",
    "GaussianSumMechanism",
    "NoiseSource",
    "PrivacyEvent",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "epsilon",
]
