"""The fixed texts that say, outside a site, why something was left out.

Anything a site's error message holds (file names, paths, exception texts, tracebacks) may
depend on its private data, and so may which check a site's reply failed. So what crosses
the site boundary and what reaches an output file is drawn from the two small vocabularies
below, never built from an exception:

- a site that refuses a round raises :class:`SiteRefusal` with one of ``SITE_REFUSALS``
  (the full error stays in the site's own log);
- the server stores, for every reply it leaves out, one of ``REJECTION_REASONS``; the
  detailed text of its own checks goes to the server log only, and the text of a site's
  error reply goes nowhere.
"""

from __future__ import annotations

# What a site says when it refuses a round (the message of its error reply).
SITE_DATA = "site refused the round: its data cannot be used"
SITE_POLICY = "site refused the round: privacy policy"
SITE_PROTOCOL = "site refused the round: secure aggregation protocol"
SITE_INTERNAL = "site refused the round: internal error"
SITE_REFUSALS = (SITE_DATA, SITE_POLICY, SITE_PROTOCOL, SITE_INTERNAL)

# Why the server left a reply (or a secure round) out: the only reasons an output may hold.
REPLY_SITE_ERROR = "site returned an error"
REPLY_MALFORMED = "reply malformed"
REPLY_UNASKED = "not asked or answered twice"
SECAGG_DROPPED = "dropped out of secure aggregation"
NO_SECURE_SUM = "no secure sum formed"
REPLY_REJECTED = "reply rejected"  # a reason of an older checkpoint that is not in this list
REJECTION_REASONS = (REPLY_SITE_ERROR, REPLY_MALFORMED, REPLY_UNASKED, SECAGG_DROPPED, NO_SECURE_SUM, REPLY_REJECTED)


class SiteRefusal(RuntimeError):
    """A site's refusal of a round, carrying only a fixed reason from ``SITE_REFUSALS``."""

    def __init__(self, reason: str) -> None:
        if reason not in SITE_REFUSALS:
            raise ValueError(f"a site refusal must be one of {SITE_REFUSALS}, got {reason!r}")
        super().__init__(reason)
        self.reason = reason


def public_rejections(entries: list[dict]) -> list[dict]:
    """Copies of rejection entries whose reason is one of ``REJECTION_REASONS`` (any other
    text, e.g. from a checkpoint written before this rule, becomes ``REPLY_REJECTED``)."""
    return [{**entry, "reason": entry.get("reason") if entry.get("reason") in REJECTION_REASONS else REPLY_REJECTED}
            for entry in entries]
