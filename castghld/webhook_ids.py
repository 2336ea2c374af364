"""The dedupe of GHL's app webhooks: the `webhookId`s acted on lately, in memory.

Guarantees:
- An id is marked before its webhook is acted on, so a copy arriving while the first one awaits GHL
  is a duplicate; if acting fails the id is forgotten, so GHL's retry is acted on.
- At most `limit` ids are kept, the oldest dropped first. Nothing survives a restart: a replayed
  INSTALL or UNINSTALL is made harmless by the ordering in `Installations`, not by this class.
"""

from __future__ import annotations

import collections

SEEN_WEBHOOK_IDS = 10_000


class RecentWebhookIds:
    def __init__(self, limit: int = SEEN_WEBHOOK_IDS):
        self.limit = limit
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __contains__(self, webhook_id: str) -> bool:
        return webhook_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def mark(self, webhook_id: str) -> None:
        """Call before acting on the webhook."""
        self._ids[webhook_id] = None
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def forget(self, webhook_id: str) -> None:
        """Acting failed: GHL's retry of this webhook must be acted on, not called a duplicate."""
        self._ids.pop(webhook_id, None)
