"""`GET /oauth/install` and `GET /oauth/callback`: the browser side of the marketplace install.

The callback answers a small HTML page (a person reads it), escaped, that names the installed
location(s); errors are HTML pages too, with GHL's reason, 400 for a bad or used code or state
(any 4xx GHL's token endpoint answers, logged at warning, never the code) and 502 when GHL fails
us — never a 500. Tokens are stored durably before the page is sent.

The callback needs no credential (marketplace installs carry no `state`), so every exchange it
would start is first admitted by `CodeExchangeLimits` (per client IP and in all, callbacks with a
verified `state` on a budget of their own); beyond that it answers 429 with `Retry-After` and
calls GHL not at all.
"""

from __future__ import annotations

import html
import logging
import math

from castghld.ghl import GHLError
from castghld.handlers.base import APIHandler
from castghld.oauth import build_install_url, verify_state
from castghld.tokens import TokenUnavailable

log = logging.getLogger("castghld.oauth")

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1><p>{text}</p></body></html>
"""


class InstallHandler(APIHandler):
    def get(self) -> None:
        self.redirect(build_install_url(self.daemon.config), status=302)


class CallbackHandler(APIHandler):
    def page(self, status: int, title: str, text: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(_PAGE.format(title=html.escape(title), text=html.escape(text)))

    async def get(self) -> None:
        code = self.get_query_argument("code", "")
        if not code:
            error = self.get_query_argument("error", "")[:100]
            if error:  # OAuth's answer when the user declined or GHL could not authorise
                text = f"GHL did not authorise the install ({error}); start it again if unintended."
                return self.page(400, "Install not authorised", text)
            return self.page(400, "Install failed", "The request has no authorisation code.")
        state = self.get_query_argument("state", None)
        if state is not None:
            problem = verify_state(self.daemon.config, state)
            if problem:
                return self.page(400, "Install failed", problem[0].upper() + problem[1:] + ".")
        client = self.request.remote_ip or ""
        wait = self.daemon.code_exchanges.admit(client, state)
        if wait > 0:
            self.set_header("Retry-After", str(math.ceil(wait)))
            return self.page(
                429, "Too many install attempts", "Too many install attempts; try again shortly."
            )
        try:
            result = await self.daemon.installations.install_from_code(code)
        except GHLError as e:
            if 400 <= e.status < 500 and e.status != 429:
                log.warning("install refused by GHL (%d): %s", e.status, e.message)
                return self.page(400, "Install failed", f"GHL refused the install: {e.message}")
            return self.page(502, "Install failed", f"GHL refused the install: {e.message}")
        except TokenUnavailable as e:
            if e.retryable:  # castghld is stopping: the code was not sent to GHL
                return self.page(503, "Install failed", "The bridge is restarting; try again.")
            return self.page(502, "Install failed", str(e))
        except OSError:
            return self.page(
                503, "Install failed", "The bridge could not save the install; try again."
            )
        self.daemon.code_exchanges.installed(client, state)
        locations = ", ".join(result["locations"]) or "none"
        text = f"Cast SMS is installed for location(s): {locations}."
        if result["failed"]:
            text += f" Could not install: {', '.join(sorted(result['failed']))}."
        self.page(200, "Cast SMS installed", text)


default_handlers = [
    (r"/oauth/install", InstallHandler),
    (r"/oauth/callback", CallbackHandler),
]
