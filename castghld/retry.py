"""Which upstream answers are worth another attempt, for both clients (GHL and Cast).

429 (rate limited), 500/502/503/504 (the upstream or a proxy in front of it failing for now) and
599 (no answer: a timeout or a connection error) may pass; every other status is final. Each
client wraps this set in its error's ``retryable``; how often and how long it retries is its own
(`ghl.GHLClient.call`, the outbound scheduler for Cast).
"""

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504, 599})
