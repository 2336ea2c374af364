"""The `castghld` command line (SPEC §1).

Guarantees: exit 0 on success; on a usage or config problem exit 2 with one line per problem on
stderr (file, key path, what is wrong) and no traceback; on a transient startup failure (address
in use, an I/O error on the state files, the state directory locked by an exiting process) exit 75
(EX_TEMPFAIL) with the same kind of lines, so systemd restarts the service; no command prints a
secret.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from castghld import __version__
from castghld.admin import LIST_DEFAULT, LIST_MAX
from castghld.config import Config, ConfigError, default_config_path, load_config
from castghld.exits import EXIT_TEMPFAIL, EXIT_USAGE, error, fail
from castghld.usage_report import add_usage_command

if TYPE_CHECKING:
    from castghld.metrics import Metrics
    from castghld.outbox import Outbox
    from castghld.signatures import SignatureVerifier
    from castghld.state import KeyRing, StateStore

# Commands that need only the config's paths, not its secrets (`operator_command`).
OPERATOR_COMMANDS = ("installs", "outbox", "forget", "accounts")

DESCRIPTION = """\
castghld makes Cast (Philippine SMS API) the SMS provider of GoHighLevel sub-accounts.
Global options (--config) may also follow the command: castghld check-config --config PATH.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one table of the commands, in `castghld --help` order (long on
    purpose: split up, a command's options would sit apart from its help text)."""
    parser = argparse.ArgumentParser(
        prog="castghld",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="config file (default: $CASTGHLD_CONFIG, else /etc/castghld/castghld.yaml)",
    )
    parser.add_argument("--version", action="version", version=f"castghld {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # --config after the command as well (`castghld check-config --config X`); SUPPRESS keeps the
    # subparser from resetting a value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="config file")

    def add_command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    add_command(
        "serve",
        help="run the daemon in the foreground",
        description="Run the daemon in the foreground until SIGTERM/SIGINT. Logs go to stderr; "
        "READY=1/STOPPING=1 go to systemd when $NOTIFY_SOCKET is set.",
    )
    check = add_command(
        "check-config",
        help="validate config, key file, webhook keys and state file",
        description="Load and validate the config, the state key file, the extra webhook public "
        "keys and the state file (decrypting it), then print a summary without secrets. "
        "Exit 0 if the daemon could start with this config, 2 otherwise. No network call "
        "unless --online.",
    )
    check.add_argument(
        "--online",
        action="store_true",
        help="also ask GHL whether client_id/client_secret are accepted and Cast whether each "
        "API key is (no SMS, no token, 5 s per request); one 'ok|FAIL|WARN what: detail' line "
        "each; a FAIL exits 2 (75 if every FAIL is an upstream not answering)",
    )
    gen = add_command(
        "gen-key",
        help="write a new random state key to PATH",
        description="Write a new random AES-256 state key to PATH, created with mode 0600. "
        "Refuses to overwrite an existing file. To rotate keys, put the new key as the first "
        "line of state.key_file and keep the old ones below it.",
    )
    gen.add_argument("path", metavar="PATH")
    gen.add_argument(
        "--if-missing",
        action="store_true",
        help="succeed without writing when PATH already exists (for setup scripts)",
    )
    installs_parser = add_command(
        "installs",
        help="list installed locations",
        description="List installed locations: location id, company id, access token expiry, "
        "status (ok, needs_reauth, inactive, uninstalled: GHL no longer lists it; pending: an "
        "INSTALL webhook not completed yet) and source (direct: the location's own OAuth "
        "install; agency: minted with an agency token; reconciled: minted by a reconciliation; "
        "webhook: a pending INSTALL). Never prints a token.",
    )
    installs_parser.add_argument(
        "--json", action="store_true", help="one JSON document (for scripts); never a token"
    )
    outbox = add_command(
        "outbox",
        help="list / show / retry / drop unfinished messages of the running daemon",
        description="Inspect the outbox of the running daemon through its admin socket "
        "(0600: run as root or the service user; found at server.admin_socket, else "
        "/run/castghld/admin.sock, else <state.dir>/admin.sock). Needs no secret. ID: the GHL "
        "message id (or Cast's, for a reply), with or without its out:/in: prefix. list: id, "
        "kind, stage, location, age. show ID: where it is (state, attempts, last error, next "
        "attempt), without its text or full number. retry ID: do its next step now (cuts a "
        "retry's wait short). retry --all: every send waiting for its retry goes now "
        "(--account, --location narrow it). drop ID: forget it (nothing more is sent or "
        "reported for it; refused while its send is in flight).",
    )
    outbox.add_argument(
        "action", nargs="?", default="list", choices=("list", "show", "retry", "drop")
    )
    outbox.add_argument("id", nargs="?", metavar="ID")
    outbox.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    outbox.add_argument(
        "--all", action="store_true", dest="every", help="retry: every send waiting for a retry"
    )
    outbox.add_argument("--account", default="", help="retry --all: only this Cast account")
    outbox.add_argument("--location", default="", help="retry --all: only this location")
    outbox.add_argument(
        "--limit",
        type=int,
        default=LIST_DEFAULT,
        metavar="N",
        help=f"list: the N oldest unfinished messages (default {LIST_DEFAULT}, at most {LIST_MAX})",
    )
    forget = add_command(
        "forget",
        help="delete a location's tokens (the running daemon does it)",
        description="Delete the stored tokens of LOCATION through the running daemon's admin "
        "socket, as an UNINSTALL webhook would; its messages are ignored from then on until it "
        "installs again.",
    )
    forget.add_argument("location", metavar="LOCATION")
    accounts = add_command(
        "accounts",
        help="the Cast accounts of the running daemon: paused or ok, credits, waiting messages",
        description="Per Cast account (by name, never the key), through the running daemon's "
        "admin socket: ok or paused (reason, since), credits (read now) and those the waiting "
        "messages need, waiting messages, sends in the last hour, its locations, its sender IDs "
        "and whether Cast lists them as approved.",
    )
    accounts.add_argument("--json", action="store_true", help="one JSON document (for scripts)")
    add_command(
        "reconcile",
        help="reconcile agency installs with GHL now",
        description="Ask GHL (GET /oauth/installedLocations, with each stored agency token) which "
        "locations have the app installed; mint a token for each one without a usable token, "
        "mark uninstalled the ones GHL no longer lists, and print what changed. The daemon does "
        "this at startup and every tokens.reconcile_interval; this command needs the state "
        "directory to itself (stop the daemon, or restart it to reconcile at once). Exit 0 when "
        "every company's list was read, 75 while the daemon runs, 1 otherwise.",
    )
    add_command(
        "demo",
        help="the whole round trip against fake GHL and Cast on loopback",
        description="Start the package's fake GHL and fake Cast on loopback and a daemon wired to "
        "them in a temporary directory; install a location, send an SMS, receive a reply, and "
        "print each hop. No account or config needed; exit 0 when every hop happened.",
    )
    add_usage_command(add_command)
    add_command(
        "install-url",
        help="print the URL that starts the OAuth install",
        description="Print the marketplace URL that starts the OAuth install of the app for a "
        "location (the same URL GET /oauth/install redirects to).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from castghld.demo import run_demo

            return run_demo()
        if args.command == "gen-key":
            return gen_key(args.path, if_missing=args.if_missing)
        path = args.config or default_config_path()
        if args.command in OPERATOR_COMMANDS:
            return operator_command(args, load_config(path, secrets=False))
        config = load_config(path)
        if args.command == "serve":
            return serve(config)
        if args.command == "check-config":
            return check_config(config, online=args.online)
        if args.command == "reconcile":
            return reconcile(config)
        if args.command == "install-url":
            return install_url(config)
        if args.command == "usage":
            from castghld.usage_report import run_usage

            return run_usage(config, args)
    except ConfigError as e:
        return fail(e.problems)
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)  # argparse only lets known commands through


def operator_command(args: argparse.Namespace, config: Config) -> int:
    """`installs`, `outbox`, `forget`, `accounts`: config loaded without its secrets (they need
    only its paths), so an operator runs them outside the unit's credentials."""
    from castghld.admin_client import accounts_command, forget, outbox_command

    if args.command == "installs":
        config.require("state.key_file")
        return installs(config, as_json=args.json)
    config.require()
    if args.command == "forget":
        return forget(config, args.location)
    if args.command == "accounts":
        return accounts_command(config, as_json=args.json)
    return outbox_command(
        config,
        args.action,
        args.id,
        as_json=args.json,
        limit=args.limit,
        every=args.every,
        account=args.account,
        location=args.location,
    )


def gen_key(path: str, *, if_missing: bool = False) -> int:
    from castghld.state import create_private_file, new_key_line

    if if_missing and os.path.exists(path):
        return 0
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700)
            print(f"created directory {directory} (mode 0700)")
        create_private_file(path, (new_key_line() + "\n").encode("ascii"))
    except FileExistsError:
        return fail([f"{path}: already exists; refusing to overwrite a state key"])
    except OSError as e:
        return fail([f"{path}: cannot write key file: {e.strerror or e}"])
    print(f"wrote new state key to {path} (mode 0600)")
    return 0


def serve(config: Config) -> int:
    from castghld.app import StartupError, run
    from castghld.log import setup_logging

    setup_logging(config.logging.level, config.logging.format)
    try:
        return asyncio.run(run(config))
    except StartupError as e:
        return fail(e.problems, e.transient)


# The offline commands build only the parts they read (app.py's startup steps): no HTTP server,
# no pipelines, so nothing is sent or posted while they run.


def _open_state(config: Config, metrics: Metrics) -> StateStore:
    """The loaded state file (`installs`, `reconcile`); StartupError if it cannot be read."""
    from castghld.startup import StartupProblems, init_state

    problems = StartupProblems()
    _keyring, state = init_state(config, metrics, problems)
    problems.raise_any()
    return state


def _load_files(config: Config) -> tuple[KeyRing, StateStore, SignatureVerifier, Outbox]:
    """What `serve` loads before it listens (check-config): key ring, state file, webhook keys
    and the outbox journal; StartupError naming every problem, as `serve` would."""
    from castghld.metrics import Metrics
    from castghld.startup import (
        StartupProblems,
        init_outbox,
        init_state,
        init_webhook_keys,
        load_outbox,
    )

    metrics = Metrics()
    problems = StartupProblems()
    keyring, state = init_state(config, metrics, problems)
    verifier = init_webhook_keys(config, metrics, problems)
    problems.raise_any()
    outbox = init_outbox(config, keyring, metrics)
    load_outbox(outbox, metrics, state)
    return keyring, state, verifier, outbox


def check_config(config: Config, online: bool = False) -> int:
    from castghld.startup import StartupError

    # Asked for --online but stopped before it: say so, or no FAIL line reads as "all accepted".
    not_run = ["online checks not run (--online): fix the problem(s) above first"] if online else []
    try:
        keyring, state, verifier, outbox = _load_files(config)
    except StartupError as e:
        return fail(e.problems + not_run, e.transient)
    try:
        print(f"config:        {config.path}")
        print(
            f"listen:        {config.server.host}:{config.server.port} (xheaders: "
            f"{'on' if config.server.xheaders else 'off'})"
        )
        print(f"public url:    {config.server.public_url}")
        print(f"redirect uri:  {config.redirect_uri}")
        print(
            f"ghl:           {config.ghl.api_base} (client id {config.ghl.client_id}, app id "
            f"{config.ghl.app_id}, legacy RSA signatures "
            f"{'accepted' if config.ghl.accept_legacy_rsa else 'refused'})"
        )
        print(
            f"cast:          {config.cast.api_base} (sender id {config.cast.sender_id or '-'}, "
            f"{config.cast.messages_per_second} msg/s, {len(config.cast.locations)} "
            "location override(s))"
        )
        print(f"webhook keys:  {len(verifier.keys)} (built in + ghl.webhook_public_keys)")
        print(f"state key:     {config.state.key_file} ({len(keyring.key_ids)} key(s))")
        print(f"state file:    {state.path} ({state.count('installs')} installation(s))")
        print(f"outbox:        {outbox.journal.path} ({len(outbox.records)} unfinished)")
        problems, transient, notes = predict_serve(config)
        for note in notes:
            print(f"warning:       {note}")
        if problems:
            return fail(problems + not_run, transient)
    finally:
        state.close()
    if online:
        code = check_online(config)
        if code:
            return code
    print("ok")
    return 0


def check_online(config: Config) -> int:
    """Print one line per online check; 0, or the exit code of the FAILs (2: a credential was
    refused or an answer was unexpected, 75: only upstreams that did not answer)."""
    from castghld.app import configure_http_client
    from castghld.online import TIMEOUT, online_checks

    configure_http_client(TIMEOUT)
    results = asyncio.run(online_checks(config))
    for result in results:
        print(result)
    failed = [r for r in results if r.level == "FAIL"]
    if not failed:
        return 0
    error(f"{len(failed)} online check(s) failed")
    return EXIT_TEMPFAIL if all(r.transient for r in failed) else EXIT_USAGE


def predict_serve(config: Config) -> tuple[list[str], bool, list[str]]:
    """What `serve` would run into that loading alone does not show: (problems, all of them
    transient, warnings). Tests the state directory (writable, lockable) and the listen address
    (bindable) the way serve uses them; both are skipped, with a note, while a daemon holds the
    state directory (its own port is then in use by design)."""
    import tempfile

    import tornado.netutil

    from castghld.state import StateError, lock_directory

    problems: list[str] = []
    transient: list[bool] = []
    notes: list[str] = []
    server, state_dir = config.server, config.state.dir
    try:
        mode = os.stat(state_dir).st_mode & 0o777
        if mode & 0o077:
            notes.append(
                f"{config.path}: state.dir {state_dir} is mode {mode:04o}: other users can list "
                "it; chmod 700 (systemd's StateDirectoryMode=0700 does)"
            )
    except OSError:
        pass  # loading the state already named a missing directory
    try:
        lock_fd = lock_directory(state_dir)
    except StateError as e:
        if "another castghld process" in str(e):
            notes.append(
                f"{state_dir}: a castghld daemon is running here; bind and lock not tested"
            )
            return problems, False, notes + _config_warnings(config)
        problems.append(f"{config.path}: state.dir: {e}")
        transient.append(e.transient)
        lock_fd = None
    try:
        fd, probe = tempfile.mkstemp(dir=state_dir, prefix=".check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        problems.append(f"{config.path}: state.dir {state_dir} is not writable: {e.strerror}")
        transient.append(False)
    try:
        if server.port:
            for sock in tornado.netutil.bind_sockets(server.port, server.host):
                sock.close()
    except OSError as e:
        problems.append(
            f"{config.path}: server.host/server.port: cannot listen on "
            f"{server.host}:{server.port}: {e.strerror or e}"
        )
        transient.append(getattr(e, "errno", None) == errno.EADDRINUSE)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    return problems, bool(transient) and all(transient), notes + _config_warnings(config)


def _config_warnings(config: Config) -> list[str]:
    server = config.server
    notes = []
    if server.public_url.startswith("http://"):
        notes.append(
            f"{config.path}: server.public_url is http://: GHL requires an https redirect URL "
            "and webhooks would travel in clear text"
        )
    if server.xheaders and server.host in ("0.0.0.0", "::", ""):  # noqa: S104 (detects it)
        notes.append(
            f"{config.path}: server.host {server.host} with server.xheaders: true: any client "
            "reaching the port directly can forge X-Forwarded-For/-Proto; listen on 127.0.0.1 "
            "behind the proxy, or set xheaders: false"
        )
    return notes


def installs(config: Config, as_json: bool = False) -> int:
    from castghld.metrics import Metrics
    from castghld.startup import StartupError

    try:
        state = _open_state(config, Metrics())
    except StartupError as e:
        return fail(e.problems, e.transient)
    try:
        rows = sorted(state.items("installs"))
        pending = sorted(state.items("pending_installs"))
    finally:
        state.close()
    if as_json:
        print(json.dumps(_installs_doc(rows, pending), indent=2))
        return 0
    if not rows and not pending:
        print("no installations")
        return 0
    print(f"{'LOCATION':<26} {'COMPANY':<26} {'TOKEN EXPIRES (UTC)':<21} {'STATUS':<13} SOURCE")
    for location_id, record in rows:
        expires = record.get("expires_at")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(expires)) if expires else "-"
        company = record.get("company_id") or "-"
        status = record.get("status", "ok")
        source = record.get("source") or "-"  # installed before sources were recorded
        print(f"{location_id:<26} {company:<26} {when:<21} {status:<13} {source}")
    for location_id, record in pending:
        if any(location_id == installed for installed, _ in rows):
            continue
        # An INSTALL webhook not completed yet: a reconciliation or the OAuth callback will.
        company = record.get("company_id") or "-"
        print(f"{location_id:<26} {company:<26} {'-':<21} {'pending':<13} webhook")
    return 0


def _installs_doc(rows: list, pending: list) -> dict[str, Any]:
    installed = {location_id for location_id, _ in rows}
    out = [
        {
            "location_id": location_id,
            "company_id": record.get("company_id"),
            "expires_at": record.get("expires_at"),
            "status": record.get("status", "ok"),
            "source": record.get("source"),
        }
        for location_id, record in rows
    ]
    out += [
        {
            "location_id": location_id,
            "company_id": record.get("company_id"),
            "expires_at": None,
            "status": "pending",
            "source": "webhook",
        }
        for location_id, record in pending
        if location_id not in installed
    ]
    return {"installations": out}


def reconcile(config: Config) -> int:
    from castghld.app import StartupError, configure_http_client, init_tokens
    from castghld.metrics import Metrics
    from castghld.state import StateError, lock_directory

    metrics = Metrics()
    try:
        state = _open_state(config, metrics)
    except StartupError as e:
        return fail(e.problems, e.transient)
    # The state and the token side only: replies waiting in the outbox stay there for `serve`.
    _ghl, installations = init_tokens(config, state, metrics)
    try:
        try:
            lock_fd = lock_directory(config.state.dir)
        except StateError as e:
            # The daemon running (or exiting) is "retry later", 75 as the exit-code table says.
            error(
                f"{e}; the daemon reconciles at startup and every "
                "tokens.reconcile_interval (restart it to reconcile now)"
            )
            return EXIT_TEMPFAIL if e.transient else 1
        try:
            configure_http_client(config.delivery.request_timeout)
            report = asyncio.run(installations.reconcile())
        except OSError as e:
            error(f"cannot save the state file: {e.strerror or e}")
            return 1
        finally:
            os.close(lock_fd)
    finally:
        state.close()
    for location_id in report["minted"]:
        print(f"minted       {location_id}")
    for location_id in report["marked"]:
        print(f"uninstalled  {location_id} (GHL no longer lists it; not texted for)")
    for location_id in report["unconfirmed"]:
        print(
            f"unconfirmed  {location_id} (not in GHL's list, GHL did not confirm it gone: still "
            "texted for; marked if the next complete list lacks it too)"
        )
    for location_id, reason in sorted(report["failed"].items()):
        print(f"failed       {location_id}: {reason} (kept; retried by the next reconciliation)")
    for company_id, reason in sorted(report["companies"].items()):
        print(f"company      {company_id}: {reason}")
    changes = len(report["minted"]) + len(report["marked"])
    print(f"{changes} change(s)" if changes else "no changes")
    return 1 if report["companies"] else 0


def install_url(config: Config) -> int:
    from castghld.oauth import STATE_LIFETIME, build_install_url

    print(build_install_url(config))
    # stderr: scripts that read the URL from stdout keep working.
    print(
        f"valid for {STATE_LIFETIME // 60} minutes; the permanent link to share is "
        f"{config.server.public_url.rstrip('/')}/oauth/install",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
