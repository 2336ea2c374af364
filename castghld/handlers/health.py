"""`GET /healthz` and `GET /metrics`: what a proxy, systemd or Prometheus asks of the daemon.

`/healthz` is 200 only while serving (503 while starting or stopping) and reveals counts, never
ids or secrets. `/metrics` is the Prometheus text format of the daemon's own registry.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from castghld import __version__
from castghld.handlers.base import APIHandler


class HealthHandler(APIHandler):
    def get(self) -> None:
        daemon = self.daemon
        serving = daemon.phase == "serving"
        self.write_json(
            200 if serving else 503,
            {
                "status": "ok" if serving else daemon.phase,
                "version": __version__,
                "uptime_seconds": round(time.time() - daemon.started_at, 1),
                "installations": daemon.state.count("installs"),
            },
        )


class MetricsHandler(APIHandler):
    def get(self) -> None:
        for update in self.daemon.metrics.before_scrape:
            update()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.daemon.metrics.registry))


default_handlers = [
    (r"/healthz", HealthHandler),
    (r"/metrics", MetricsHandler),
]
