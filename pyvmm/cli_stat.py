"""`pyvmm stat --api-sock S`: a running VM's exit and device counters, refreshed every
second, like kvm_stat: per exit reason and per device, the total and the rate over
the last interval.  `--once` prints one snapshot (two polls an interval apart) and
ends, for tests and scripts.  It polls the API's GET /pyvmm/stats.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvmm.errors import PyvmmError

STATS_PATH = "/pyvmm/stats"
DEFAULT_INTERVAL_S = 1.0
MIN_INTERVAL_S = 0.05
CLEAR_SCREEN = "\x1b[H\x1b[J"          # home, erase below: a terminal redraws in place


def add_parser(sub, parser_class) -> None:  # noqa: ANN001 - argparse's subparsers
    stat = sub.add_parser("stat", help="a running VM's exit and device counters, refreshed "
                                       "every second (like kvm_stat)")
    stat.add_argument("--api-sock", type=Path, required=True, help="the VM's API socket")
    stat.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="S",
                      help=f"seconds between refreshes (default {DEFAULT_INTERVAL_S:g})")
    stat.add_argument("--once", action="store_true",
                      help="print one snapshot (rates over one interval) and end")


class ApiGone(PyvmmError):
    """The API socket does not answer (no VM there, or it has ended)."""


@dataclass(frozen=True)
class Poll:
    """One answer of GET /pyvmm/stats."""
    state: str
    t_ns: int
    exits: dict[str, int]
    devices: dict[str, int]


def _counts(value: Any, what: str) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in value.items()):
        raise PyvmmError(f"{STATS_PATH} answered a malformed {what!r}: is this a pyvmm?")
    return value


def poll(client: Any) -> Poll:
    try:
        status, body = client.get(STATS_PATH)
    except OSError as exc:
        raise ApiGone(f"cannot reach the API: {exc.strerror or exc}") from None
    if status != 200 or not isinstance(body, dict):
        message = body.get("fault_message") if isinstance(body, dict) else None
        raise PyvmmError(f"GET {STATS_PATH}: {message or status} (a pyvmm API socket?)")
    t_ns = body.get("monotonic_ns")
    if type(t_ns) is not int:
        raise PyvmmError(f"{STATS_PATH} answered no monotonic_ns: is this a pyvmm?")
    return Poll(str(body.get("state", "?")), t_ns, _counts(body.get("exits"), "exits"),
                _counts(body.get("devices"), "devices"))


def _rows(now: dict[str, int], before: dict[str, int] | None, seconds: float) -> list[list[str]]:
    rows = []
    for name in sorted(now, key=lambda n: (-now[n], n)):
        rate = "" if before is None or seconds <= 0 else \
            f"{(now[name] - before.get(name, 0)) / seconds:.0f}"
        rows.append([name, str(now[name]), rate])
    return rows


def _table(title: str, rows: list[list[str]]) -> list[str]:
    headers = [title, "total", "per s"]
    widths = [max(len(c) for c in col) for col in zip(headers, *rows)]
    return [f"{cells[0]:<{widths[0]}}  {cells[1]:>{widths[1]}}  {cells[2]:>{widths[2]}}".rstrip()
            for cells in [headers, *rows]]


def render(sock: Path, now: Poll, before: Poll | None) -> str:
    seconds = (now.t_ns - before.t_ns) / 1e9 if before else 0.0
    total = sum(now.exits.values())
    rate = "" if before is None or seconds <= 0 else \
        f", {(total - sum(before.exits.values())) / seconds:.0f}/s"
    lines = [f"pyvmm stat {sock}: {now.state}, {total} exits{rate}", ""]
    lines += _table("exit reason", _rows(now.exits, before.exits if before else None, seconds))
    lines.append("")
    active = {name: n for name, n in now.devices.items() if n}
    lines += _table("device", _rows(active, before.devices if before else None, seconds))
    return "\n".join(lines) + "\n"


def cmd_stat(args: argparse.Namespace) -> int:
    from pyvmm.api.client import ApiClient
    if not args.interval >= MIN_INTERVAL_S:
        raise PyvmmError(f"--interval must be at least {MIN_INTERVAL_S} s")
    client = ApiClient(str(args.api_sock), timeout=10)
    before = poll(client)
    redraw = sys.stdout.isatty() and not args.once
    while True:
        time.sleep(args.interval)
        try:
            now = poll(client)
        except ApiGone:
            # The VM ended while we watched it (its socket goes with it): not an error.
            print(f"pyvmm stat: {args.api_sock} is gone: the VM has ended", file=sys.stderr)
            return 0
        text = render(args.api_sock, now, before)
        sys.stdout.write((CLEAR_SCREEN if redraw else "") + text + ("" if redraw else "\n"))
        sys.stdout.flush()
        if args.once:
            return 0
        before = now
