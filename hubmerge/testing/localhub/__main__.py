"""Command line: run the local Hub until SIGINT/SIGTERM.

    python -m hubmerge.testing.localhub --port 0 --root DIR [--host 127.0.0.1] [--user NAME:TOKEN[:ROLE]]... \
        [--org ORG:MEMBER,MEMBER]... [--bandwidth RATE] [--verbose]

Prints exactly two lines on stdout once it is listening: the endpoint URL (``http://127.0.0.1:PORT``), then the
admin secret, new at every start, that requests to the control endpoints (``/_localhub/users``, ``/_localhub/faults``)
must carry in the ``X-Localhub-Admin`` header. Everything else goes to stderr. Users and orgs given here are added to
``DIR`` and persist with the rest of its state.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from .hub import LocalHub


def _parse_user(spec: str) -> tuple[str, str, str]:
    parts = spec.split(":")
    if len(parts) == 2:
        parts.append("write")
    if len(parts) != 3 or not all(parts) or parts[2] not in ("read", "write"):
        raise argparse.ArgumentTypeError(f"expected NAME:TOKEN[:read|write], got {spec.split(':', 1)[0]}:...")
    return parts[0], parts[1], parts[2]


def _parse_org(spec: str) -> tuple[str, list[str]]:
    org, sep, members = spec.partition(":")
    if not org:
        raise argparse.ArgumentTypeError(f"expected ORG:MEMBER,MEMBER, got {spec!r}")
    return org, [m for m in members.split(",") if m] if sep else []


_RATE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def _rate(spec: str) -> int:
    number = spec.rstrip("KMGBkmgb")
    unit = spec[len(number) :].upper()
    try:
        rate = int(float(number) * _RATE_UNITS[unit])
    except (KeyError, ValueError):
        rate = 0
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"expected bytes per second like 80MB or 80000000, got {spec!r}")
    return rate


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m hubmerge.testing.localhub``."""
    p = argparse.ArgumentParser(
        prog="python -m hubmerge.testing.localhub", description="Local Hugging Face Hub-compatible server (for tests)."
    )
    p.add_argument("--root", required=True, help="directory holding the server's state (created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="TCP port, 0 for a free one (default)")
    p.add_argument(
        "--user",
        action="append",
        type=_parse_user,
        default=[],
        metavar="NAME:TOKEN[:ROLE]",
        help="add a user with this token; ROLE is write (default) or read; repeatable",
    )
    p.add_argument(
        "--org",
        action="append",
        type=_parse_org,
        default=[],
        metavar="ORG:MEMBER,...",
        help="add an organisation and its members; repeatable",
    )
    p.add_argument("--tree-page-size", type=int, default=1000, help="entries per page of tree listings")
    p.add_argument(
        "--bandwidth",
        type=_rate,
        metavar="RATE",
        help="throttle like a network link: RATE (bytes/s, or e.g. 80MB) in each direction, shared by all transfers",
    )
    p.add_argument("--verbose", action="store_true", help="log METHOD PATH STATUS of each request to stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server; return the process exit code (0 after SIGINT/SIGTERM)."""
    args = build_parser().parse_args(argv)
    hub = LocalHub(
        args.root,
        host=args.host,
        port=args.port,
        verbose=args.verbose,
        tree_page_size=args.tree_page_size,
        bandwidth=args.bandwidth,
    )
    try:
        for name, token, role in args.user:
            hub.storage.auth.add_user(name, role=role, token=token)
        for org, members in args.org:
            hub.add_org(org, members)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        hub.start()
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(hub.url, hub.admin_secret, sep="\n", flush=True)
    try:
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        hub.stop()
        print("localhub: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
