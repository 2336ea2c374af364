"""Fake GHL: the OAuth token endpoints, the conversation and contact routes castghld uses
(SPEC §4), and signed webhooks to castghld.

`_FakeGHLOAuth` is GHL's OAuth side: token pairs and the grants they stand for, authorization
codes, refresh grants, agency location tokens, installed locations, and the methods tests seed
them with. `FakeGHL` adds the location API (status updates, contact upserts, inbound messages,
under GHL's rate limit), the webhooks it signs, and the route table of both.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import secrets
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from castghld.fakes.server import Answer, Call, _FakeServer, _prune, _Reject

GHL_VERSION = "2021-04-15"
GHL_VERSION_CONTACTS = "2021-07-28"  # /contacts/* and /oauth/locationToken
GHL_SCOPES = (
    "conversations/message.write conversations/message.readonly conversations.write "
    "conversations.readonly contacts.readonly contacts.write"
)
GHL_RATE_MAX = 100
GHL_RATE_WINDOW = 10.0
E164 = re.compile(r"\+[1-9]\d{6,14}")
# Body fields the GHL OpenAPI files (shared/reference) define; anything else is a violation.
STATUS_FIELDS = frozenset("status error emailMessageId recipients".split())
UPSERT_FIELDS = frozenset(
    "firstName lastName name email locationId gender phone address1 city state postalCode website "
    "timezone dnd dndSettings inboundDndSettings tags customFields source dateOfBirth country "
    "companyName assignedTo createNewIfDuplicateAllowed".split()
)
INBOUND_FIELDS = frozenset(
    "type attachments message conversationId contactId conversationProviderId altId date".split()
)


@dataclass
class _Grant:
    """What a GHL token pair stands for."""

    user_type: str
    company_id: str
    location_id: str | None = None
    approved_locations: list[str] = field(default_factory=list)
    user_id: str = field(default_factory=lambda: "user-" + secrets.token_hex(4))
    redirect_uri: str | None = None

    @property
    def subject(self) -> str:
        """The id the pair belongs to: its location, or its company for an agency pair."""
        return (self.location_id or "") if self.user_type == "Location" else self.company_id


@functools.lru_cache(maxsize=1)
def _signing_keys() -> dict[str, Any]:
    """One set of webhook signing keys per process (RSA key generation is slow)."""
    return {
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ecdsa": ec.generate_private_key(ec.SECP256R1()),
    }


def _ghl_error(status: int, message: str) -> Answer:
    return Answer(status, {"statusCode": status, "message": message})


def _oauth_error(error: str, description: str) -> dict[str, str]:
    return {"error": error, "error_description": description}


def _invalid_grant(description: str) -> Answer:
    return Answer(400, _oauth_error("invalid_grant", f"Invalid grant: {description}"))


class _FakeGHLOAuth(_FakeServer):
    """GHL's OAuth side: token pairs and what they stand for (`_Grant`), the token endpoints,
    and the access-token check every other route makes (`_bearer_grant`). Its routes are rows
    of `FakeGHL.routes`."""

    def __init__(
        self,
        client_id: str = "test-client",
        client_secret: str = "test-secret",  # noqa: S107
        token_lifetime: int = 86399,
    ) -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_lifetime = token_lifetime
        self.refresh_count: Counter[str] = Counter()  # successful refreshes by location/company
        self.refresh_reuse = 0
        self.issued_tokens: list[str] = []  # every access and refresh token handed out (audits)
        self._codes: dict[str, _Grant] = {}
        self._access: dict[str, tuple[_Grant, float]] = {}  # token -> (grant, expires, epoch s)
        self._refresh: dict[str, _Grant] = {}
        self._spent_refresh: set[str] = set()
        self._company_locations: defaultdict[str, set[str]] = defaultdict(set)
        self._inactive: set[str] = set()
        # How /oauth/installedLocations may page differently (GHL documents a default page of 20
        # and no maximum): serve at most this many per page whatever `limit` asks; ignore `skip`;
        # leave out locations still installed (a lagging index); `uninstall_after_pages`.
        self.installed_page_cap: int | None = None
        self.installed_ignores_skip = False
        self.hidden_from_list: set[str] = set()
        self._installed_pages = 0  # pages served so far
        self._uninstall_after: list[tuple[int, str]] = []  # (pages served, location id)

    def _error_body(self, status: int, message: str) -> Any:
        return {"statusCode": status, "message": message}

    def _route(self, call: Call) -> tuple[str, Callable[..., Answer], dict[str, str]]:
        # `hang("refresh")` holds only refresh-token grants (a code exchange still goes through).
        route, action, params = super()._route(call)
        if route == "token" and (call.form or {}).get("grant_type") == "refresh_token":
            return "refresh", action, params
        return route, action, params

    async def _hold(self, route: str) -> None:
        if route == "refresh" and "refresh" not in self._hangs:
            route = "token"  # hang("token") holds every token call, refreshes included
        await super()._hold(route)

    @property
    def app_id(self) -> str:
        """The marketplace app's id: the part of the client id before the first "-" (as the
        SDK derives it); app webhooks carry it as ``appId``."""
        return self.client_id.split("-", 1)[0]

    # -- seeding and state changes -------------------------------------------------------------

    def add_auth_code(
        self,
        code: str,
        location_id: str | None = None,
        company_id: str = "comp1",
        user_type: str = "Location",
        approved_locations: list[str] | None = None,
        redirect_uri: str | None = None,
    ) -> None:
        """Register a one-time code, as GHL does when a user approves the install."""
        if user_type not in ("Location", "Company"):
            raise ValueError("user_type must be Location or Company")
        if user_type == "Location" and not location_id:
            raise ValueError("a Location code needs a location_id")
        approved = list(approved_locations or ([location_id] if location_id else []))
        for location in approved:
            self.add_company_location(company_id, location)
        if user_type == "Company":
            location_id = None
        grant = _Grant(user_type, company_id, location_id, approved, redirect_uri=redirect_uri)
        self._codes[code] = grant

    def add_company_location(self, company_id: str, location_id: str) -> None:
        """The app is installed on this location of the company: the agency token may mint its
        token and ``/oauth/installedLocations`` lists it."""
        self._company_locations[company_id].add(location_id)

    def uninstall_app(self, location_id: str) -> None:
        """The app was uninstalled from the location: no longer listed nor mintable, and its
        refresh tokens are revoked (as GHL does)."""
        for locations in self._company_locations.values():
            locations.discard(location_id)
        self.revoke(location_id)

    def uninstall_after_pages(self, location_id: str, pages: int = 1) -> None:
        """`uninstall_app(location_id)` once `pages` more installedLocations pages are served:
        an uninstall between two page reads, which shifts the pages after it."""
        self._uninstall_after.append((self._installed_pages + pages, location_id))

    def issue_tokens(
        self, location_id: str, company_id: str = "comp1", expires_in: int = 86399
    ) -> dict[str, Any]:
        """A valid Location pair, shaped like the token endpoint's answer (to seed state)."""
        self.add_company_location(company_id, location_id)
        return self._issue(_Grant("Location", company_id, location_id, [location_id]), expires_in)

    def issue_company_tokens(
        self, company_id: str, approved_locations: list[str], expires_in: int = 86399
    ) -> dict[str, Any]:
        """A valid Company (agency) pair that may mint tokens for `approved_locations`."""
        for location in approved_locations:
            self.add_company_location(company_id, location)
        grant = _Grant("Company", company_id, None, list(approved_locations))
        return self._issue(grant, expires_in)

    def deactivate(self, location_id: str) -> None:
        """Refreshes and location tokens for it get 400 "Location is not active" (none spent)."""
        self._inactive.add(location_id)

    def reactivate(self, location_id: str) -> None:
        self._inactive.discard(location_id)

    def revoke(self, location_id: str) -> None:
        """Its live refresh tokens (location or company id) get invalid_grant (not a reuse)."""
        for token, grant in list(self._refresh.items()):
            if grant.subject == location_id:
                del self._refresh[token]

    def expire_access_tokens(self, location_id: str | None = None) -> None:
        """Access tokens issued so far (for one location or company, or all) now get 401."""
        for token, (grant, _) in list(self._access.items()):
            if location_id is None or grant.subject == location_id:
                del self._access[token]

    def _issue(self, grant: _Grant, expires_in: int | None = None) -> dict[str, Any]:
        lifetime = self.token_lifetime if expires_in is None else expires_in
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self.issued_tokens += [access, refresh]
        self._access[access] = (grant, time.time() + lifetime)
        self._refresh[refresh] = grant
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "refresh_token": refresh,
            "scope": GHL_SCOPES,
            "userType": grant.user_type,
            "companyId": grant.company_id,
            "isBulkInstallation": grant.user_type == "Company",
            "userId": grant.user_id,
        }
        if grant.user_type == "Location":
            answer["locationId"] = grant.location_id
        else:
            answer["approvedLocations"] = list(grant.approved_locations)
        return answer

    # -- /oauth/token --------------------------------------------------------------------------

    def _token(self, call: Call) -> Answer:
        if "Version" in call.headers:
            self._violate(call, 400, "Version header on /oauth/token (the OAuth spec has none)")
        form = self._client_form(call)
        if form.get("user_type") not in ("Location", "Company"):
            self._violate(call, 422, f"user_type {form.get('user_type')!r} is not Location/Company")
        if form.get("grant_type") == "authorization_code":
            return self._exchange_code(call, form)
        if form.get("grant_type") == "refresh_token":
            return self._refresh_grant(call, form)
        body = _oauth_error("unsupported_grant_type", "grant_type not supported")
        self._violate(call, 400, f"grant_type {form.get('grant_type')!r}", body)

    def _client_form(self, call: Call) -> dict[str, str]:
        if call.form is None:
            body = _oauth_error("invalid_request", "form-encoded body expected")
            self._violate(call, 400, f"Content-Type {call.headers.get('Content-Type')!r}", body)
        credentials = (call.form.get("client_id"), call.form.get("client_secret"))
        if credentials != (self.client_id, self.client_secret):
            body = _oauth_error("invalid_client", "client authentication failed")
            self._violate(call, 401, "wrong client_id or client_secret", body)
        return call.form

    def _exchange_code(self, call: Call, form: dict[str, str]) -> Answer:
        if not form.get("code") or not form.get("redirect_uri"):
            body = _oauth_error("invalid_request", "code and redirect_uri are required")
            self._violate(call, 400, "code and redirect_uri are required", body)
        self._take_failure("token")
        grant = self._codes.get(form["code"])
        if grant is None:
            return _invalid_grant("authorization code is invalid")
        if grant.redirect_uri is not None and form["redirect_uri"] != grant.redirect_uri:
            body = _invalid_grant("redirect_uri does not match").body
            self._violate(call, 400, f"redirect_uri {form['redirect_uri']!r} not registered", body)
        del self._codes[form["code"]]
        return Answer(200, self._issue(grant))

    def _refresh_grant(self, call: Call, form: dict[str, str]) -> Answer:
        token = form.get("refresh_token", "")
        if not token:
            body = _oauth_error("invalid_request", "refresh_token is required")
            self._violate(call, 400, "refresh_token is required", body)
        self._take_failure("token")
        grant = self._refresh.get(token)
        if grant is None:
            if token in self._spent_refresh:
                self.refresh_reuse += 1
            return _invalid_grant("refresh token is invalid")
        if form["user_type"] != grant.user_type:
            body = _invalid_grant("user_type does not match the token").body
            self._violate(call, 400, f"user_type {form['user_type']} for a {grant.user_type}", body)
        if grant.subject in self._inactive:
            return _ghl_error(400, "Location is not active")
        del self._refresh[token]
        self._spent_refresh.add(token)
        self.refresh_count[grant.subject] += 1
        return Answer(200, self._issue(grant))

    # -- /oauth/locationToken ------------------------------------------------------------------

    def _location_token(self, call: Call) -> Answer:
        grant = self._bearer_grant(call, GHL_VERSION_CONTACTS)
        form = call.form
        if form is None:
            self._violate(call, 422, f"Content-Type {call.headers.get('Content-Type')!r}")
        if grant.user_type != "Company" or form.get("companyId") != grant.company_id:
            self._violate(call, 401, "needs the agency token of the form's companyId")
        location_id = form.get("locationId", "")
        self._take_failure("location_token")
        if location_id not in self._company_locations[grant.company_id]:
            return _ghl_error(400, "Location not found for this company")
        if location_id in self._inactive:
            return _ghl_error(400, "Location is not active")
        return Answer(200, self._issue(_Grant("Location", grant.company_id, location_id)))

    # -- GET /oauth/installedLocations --------------------------------------------------------

    INSTALLED_QUERY = frozenset(
        "companyId appId isInstalled skip limit query onTrial planId".split()
    )

    def _installed_locations(self, call: Call) -> Answer:
        grant = self._bearer_grant(call, GHL_VERSION_CONTACTS)
        query = call.query
        unknown = sorted(set(query) - self.INSTALLED_QUERY)
        if unknown:
            self._violate(call, 422, f"unknown query parameters {unknown}")
        if grant.user_type != "Company" or query.get("companyId") != grant.company_id:
            self._violate(call, 401, "needs the agency token of the query's companyId")
        if query.get("appId") != self.app_id:
            self._violate(call, 422, f"appId {query.get('appId')!r} is not {self.app_id!r}")
        if query.get("isInstalled", "true") not in ("true", "false"):
            self._violate(call, 422, "isInstalled must be true or false")
        skip, limit = query.get("skip", "0"), query.get("limit", "20")
        if not skip.isdigit() or not limit.isdigit() or not 1 <= int(limit) <= 500:
            self._violate(call, 422, "skip must be >= 0 and limit 1..500 (integers)")
        self._take_failure("installed_locations")
        installed = sorted(self._company_locations[grant.company_id] - self.hidden_from_list)
        start = 0 if self.installed_ignores_skip else int(skip)
        size = min(int(limit), self.installed_page_cap or int(limit))
        locations = [
            {"_id": lid, "name": f"Location {lid}", "address": "", "isInstalled": True}
            for lid in installed[start : start + size]
        ]
        self._installed_pages += 1
        for due, location_id in list(self._uninstall_after):
            if due <= self._installed_pages:
                self._uninstall_after.remove((due, location_id))
                self.uninstall_app(location_id)
        return Answer(
            200,
            {"locations": locations, "count": len(installed), "installToFutureLocations": True},
        )

    # -- access tokens: every route but /oauth/token -------------------------------------------

    def _bearer_grant(self, call: Call, version: str) -> _Grant:
        if call.headers.get("Version") != version:
            self._violate(call, 400, f"Version {call.headers.get('Version')!r}, not {version}")
        authorization = call.headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            self._violate(call, 401, "no Authorization: Bearer header")
        grant, expires = self._access.get(authorization[len("Bearer ") :], (None, 0.0))
        if grant is None or expires <= time.time():
            raise _Reject(_ghl_error(401, "Invalid JWT"))
        return grant


class FakeGHL(_FakeGHLOAuth):
    """GHL's OAuth token endpoints and the conversation and contact routes castghld uses."""

    def __init__(
        self,
        client_id: str = "test-client",
        client_secret: str = "test-secret",  # noqa: S107
        token_lifetime: int = 86399,
    ) -> None:
        super().__init__(client_id, client_secret, token_lifetime)
        self.statuses: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self.contacts: dict[tuple[str, str], dict[str, Any]] = {}  # (location, phone) -> contact
        self.deleted_contacts: set[str] = set()
        self.upserts = 0
        self.inbound_messages: list[dict[str, Any]] = []
        self.webhook_messages: dict[str, str] = {}  # messageId -> locationId, from post_webhook
        # A Custom conversation provider: inbound posts without this conversationProviderId get
        # GHL's silent drop (201, empty body, nothing stored). "" : no such requirement.
        self.custom_provider_id = ""
        self.dropped_inbound = 0
        self._no_provider: Counter[str] = Counter()
        self._rate: defaultdict[str, deque[float]] = defaultdict(deque)
        self._conversations: dict[str, str] = {}

    # -- seeding and state changes -------------------------------------------------------------

    def delete_contact(self, location_id: str, phone: str) -> None:
        """A GHL user deleted (or merged) this contact: its id now gets 400 "Contact not found"."""
        contact = self.contacts.pop((location_id, phone))
        self.deleted_contacts.add(contact["id"])

    def no_provider_for(self, message_id: str, times: int) -> None:
        """The next `times` status updates of this message get GHL's transient 403."""
        self._no_provider[message_id] += times

    # -- location API: rate limit, JSON body ---------------------------------------------------

    def _count_rate(self, call: Call, location_id: str) -> dict[str, str]:
        now = time.monotonic()
        times = self._rate[location_id]
        _prune(times, GHL_RATE_WINDOW, now)
        headers = {
            "X-RateLimit-Max": str(GHL_RATE_MAX),
            "X-RateLimit-Interval-Milliseconds": str(int(GHL_RATE_WINDOW * 1000)),
            "X-RateLimit-Remaining": "0",
        }
        if len(times) >= GHL_RATE_MAX:
            self._violate(call, 429, "rate limit exceeded", headers=headers)
        times.append(now)
        headers["X-RateLimit-Remaining"] = str(GHL_RATE_MAX - len(times))
        return headers

    def _api_call(self, call: Call, version: str, act: Callable[..., Answer], *args: str) -> Answer:
        """Version, token, rate limit, JSON object body; then `act(call, body, location, *args)`."""
        grant = self._bearer_grant(call, version)
        if grant.user_type != "Location":
            self._violate(call, 401, "agency token used on a location route")
        headers = self._count_rate(call, grant.subject)
        try:
            if not isinstance(call.json, dict):
                self._violate(call, 422, "body is not a JSON object (Content-Type json)")
            answer = act(call, call.json, grant.subject, *args)
        except _Reject as e:
            answer = e.answer
        answer.headers = {**headers, **answer.headers}  # a scripted failure's headers win
        return answer

    def _check_fields(self, call: Call, body: dict[str, Any], allowed: frozenset[str]) -> None:
        unknown = sorted(set(body) - allowed)
        if unknown:
            self._violate(call, 422, f"unknown fields {unknown}")

    # -- PUT /conversations/messages/{id}/status -----------------------------------------------

    def _status(self, call: Call, message_id: str) -> Answer:
        return self._api_call(call, GHL_VERSION, self._update_status, message_id)

    def _update_status(
        self, call: Call, body: dict[str, Any], location_id: str, message_id: str
    ) -> Answer:
        self._check_fields(call, body, STATUS_FIELDS)
        status = body.get("status")
        if status not in ("delivered", "failed", "pending", "read"):
            self._violate(call, 422, f"status {status!r} is not delivered|failed|pending|read")
        if "error" in body:
            self._check_status_error(call, status, body["error"])
        owner = self.webhook_messages.get(message_id)
        if owner is not None and owner != location_id:
            self._violate(call, 403, f"message of location {owner} updated as {location_id}")
        self._take_failure("status")
        if self._no_provider[message_id] > 0:
            self._no_provider[message_id] -= 1
            return _ghl_error(403, "No conversation provider found for this message")
        self.statuses[message_id].append(body)
        conversation_id = self._conversation(location_id, message_id)
        return Answer(
            200, {"conversationId": conversation_id, "messageId": message_id, "status": status}
        )

    def _check_status_error(self, call: Call, status: Any, error: Any) -> None:
        if status != "failed":
            self._violate(call, 422, f"error given with status {status!r} (only with failed)")
        if not isinstance(error, dict) or set(error) - {"code", "type", "message"}:
            self._violate(call, 422, "error must be an object {code, type?, message}")
        for key in ("code", "message"):
            if not isinstance(error.get(key), str) or not error[key]:
                self._violate(call, 422, f"error.{key} must be a non-empty string")
        if not isinstance(error.get("type", ""), str):
            self._violate(call, 422, "error.type must be a string")

    def _conversation(self, location_id: str, contact_or_message: str) -> str:
        key = f"{location_id}/{contact_or_message}"
        return self._conversations.setdefault(key, "conv-" + secrets.token_hex(6))

    # -- POST /contacts/upsert -----------------------------------------------------------------

    def _upsert(self, call: Call) -> Answer:
        return self._api_call(call, GHL_VERSION_CONTACTS, self._upsert_contact)

    def _upsert_contact(self, call: Call, body: dict[str, Any], location_id: str) -> Answer:
        self._check_fields(call, body, UPSERT_FIELDS)
        if body.get("locationId") != location_id:
            self._violate(call, 403, f"locationId {body.get('locationId')!r} is not the token's")
        phone = body.get("phone")
        if not isinstance(phone, str) or not E164.fullmatch(phone):
            self._violate(call, 422, f"phone {phone!r} is not an E.164 string")
        self._take_failure("upsert")
        self.upserts += 1
        is_new = (location_id, phone) not in self.contacts
        contact = self.contacts.setdefault(
            (location_id, phone),
            {"id": "contact-" + secrets.token_hex(6), "locationId": location_id, "phone": phone},
        )
        return Answer(
            200, {"new": is_new, "contact": dict(contact), "traceId": secrets.token_hex(8)}
        )

    # -- POST /conversations/messages/inbound --------------------------------------------------

    def _inbound(self, call: Call) -> Answer:
        return self._api_call(call, GHL_VERSION, self._add_inbound)

    def _add_inbound(self, call: Call, body: dict[str, Any], location_id: str) -> Answer:
        self._check_inbound(call, body, location_id)
        self._take_failure("inbound")
        if (
            self.custom_provider_id
            and body.get("conversationProviderId") != self.custom_provider_id
        ):
            self.dropped_inbound += 1  # GHL's known behaviour: 2xx, empty body, nothing stored
            return Answer(201, "")
        self.inbound_messages.append({**body, "locationId": location_id})
        return Answer(
            200,
            {
                "success": True,
                "conversationId": self._conversation(location_id, body["contactId"]),
                "messageId": "msg-" + secrets.token_hex(6),
                "message": "Message added successfully",
                "contactId": body["contactId"],
            },
        )

    def _check_inbound(self, call: Call, body: dict[str, Any], location_id: str) -> None:
        self._check_fields(call, body, INBOUND_FIELDS)
        if body.get("type") != "SMS":
            self._violate(call, 422, f"type {body.get('type')!r}, expected 'SMS'")
        contact_ids = {c["id"] for (loc, _), c in self.contacts.items() if loc == location_id}
        if body.get("contactId") in self.deleted_contacts:
            raise _Reject(_ghl_error(400, "Contact not found"))
        if body.get("contactId") not in contact_ids:
            self._violate(call, 422, f"contactId {body.get('contactId')!r} is not a contact here")
        for key in ("message", "altId", "date"):
            if not isinstance(body.get(key), str):
                self._violate(call, 422, f"{key} must be a string")
        try:
            datetime.fromisoformat(body["date"].replace("Z", "+00:00"))
        except ValueError:
            self._violate(call, 422, f"date {body['date']!r} is not ISO 8601")
        attachments = body.get("attachments", [])
        if not isinstance(attachments, list) or not all(isinstance(a, str) for a in attachments):
            self._violate(call, 422, "attachments must be a list of URL strings")
        if not isinstance(body.get("conversationProviderId", ""), str):
            self._violate(call, 422, "conversationProviderId must be a string")

    # -- webhooks, GHL -> castghld -------------------------------------------------------------

    def write_public_keys(self, directory: str | Path) -> list[str]:
        """Write the three public keys as PEM (SubjectPublicKeyInfo); their paths."""
        paths = []
        for alg, key in _signing_keys().items():
            path = Path(directory) / f"fake-ghl-{alg}.pem"
            pem = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            path.write_bytes(pem)
            paths.append(str(path))
        return paths

    def sign(self, body: bytes, alg: str = "ed25519") -> dict[str, str]:
        """Headers signing `body`: X-GHL-Signature (ed25519) or X-WH-Signature (rsa, ecdsa)."""
        key = _signing_keys()[alg]
        if alg == "ed25519":
            return {"X-GHL-Signature": base64.b64encode(key.sign(body)).decode("ascii")}
        if alg == "rsa":
            signature = key.sign(body, padding.PKCS1v15(), hashes.SHA256())
        else:
            signature = key.sign(body, ec.ECDSA(hashes.SHA256()))
        return {"X-WH-Signature": base64.b64encode(signature).decode("ascii")}

    async def post_webhook(
        self,
        url: str,
        payload: dict[str, Any] | bytes,
        alg: str = "ed25519",
        headers: dict[str, str] | None = None,
        raise_error: bool = False,
    ) -> HTTPResponse:
        """POST a signed JSON webhook; `headers` go last (to tamper with or blank a signature)."""
        if isinstance(payload, dict) and payload.get("messageId") and payload.get("locationId"):
            self.webhook_messages[str(payload["messageId"])] = str(payload["locationId"])
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        signed = {"Content-Type": "application/json", **self.sign(body, alg), **(headers or {})}
        request = HTTPRequest(url, method="POST", body=body, headers=signed)
        return await AsyncHTTPClient().fetch(request, raise_error=raise_error)

    # -- route table: (method, path regex, route name for scripting, handler) ------------------

    routes = (
        ("POST", r"/oauth/token", "token", "_token"),
        ("POST", r"/oauth/locationToken", "location_token", "_location_token"),
        ("GET", r"/oauth/installedLocations", "installed_locations", "_installed_locations"),
        ("PUT", r"/conversations/messages/(?P<message_id>[^/]+)/status", "status", "_status"),
        ("POST", r"/contacts/upsert", "upsert", "_upsert"),
        ("POST", r"/conversations/messages/inbound", "inbound", "_inbound"),
    )
