"""``mcdeploy status --watch``: live progress bars per deployment and per client.

Server side.  Reads only Redis (the DPs write per-client blocks and per-session figures each
second), redraws at a bounded rate (``--interval``, at least 0.2 s), stops by itself once every
shown deployment has ended, and leaves cleanly on Ctrl-C.  ``--once`` draws one frame without
cursor tricks, for scripts and tests.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from mcsite.state import TERMINAL, State

MAX_CLIENT_ROWS = 50
STYLE = {"finished": "green", "failed": "red", "cancelled": "yellow", "transferring": "cyan"}


def _f(v: Any, default: float = 0.0) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _bar(done: float, total: float, width: int = 30) -> ProgressBar:
    return ProgressBar(total=max(total, 1.0), completed=min(done, max(total, 1.0)), width=width)


def _eta(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def frame(state: State, dep_ids: list[str]) -> tuple[Group, bool]:
    """One drawing of these deployments, and whether every one of them has ended."""
    parts: list[Any] = []
    ended = True
    for dep_id in dep_ids:
        dep = state.get_deployment(dep_id)
        ended = ended and dep["state"] in TERMINAL
        expected = int(_f(dep.get("expected")))
        done = int(_f(dep.get("clients_done")))
        failed = int(_f(dep.get("clients_failed"))) + int(_f(dep.get("clients_cancelled")))
        sessions = state.list_sessions(dep_id)
        live = [s for s in sessions if s.get("state") not in TERMINAL]
        rate = sum(_f(s.get("live_rate_mbps")) for s in live)
        etas = [_f(s["live_eta_s"]) for s in live if s.get("live_eta_s") not in (None, "")]
        blocks_total = max((_f(s.get("live_blocks_total")) for s in sessions), default=0.0)
        head = Table.grid(padding=(0, 1))
        st = dep["state"]
        head.add_row(Text(f"{dep_id}", style="bold"), Text(st, style=STYLE.get(st, "")),
                     _bar(done + failed, expected or 1), Text(f"{done}/{expected} done, {failed} failed"),
                     Text(f"{rate:.1f} Mb/s" if live else ""), Text(f"ETA {_eta(max(etas))}" if etas else ""),
                     Text(f"image {dep.get('image')} via {dep.get('dp')}"))
        parts.append(head)
        if dep.get("reason"):
            parts.append(Text(f"  {dep['reason']}", style="dim"))
        for s in sessions:
            parts.append(Text(f"  session {int(s['id']):x} on {s.get('dp')}: {s.get('state')}"
                              + (f", first pass {s['live_percent']} %" if s.get("live_percent") else "")
                              + (f", {s['live_rate_mbps']} Mb/s" if s.get("live_rate_mbps") else "")
                              + (f", joined {s['live_clients_joined']}" if s.get("live_clients_joined") else "")
                              + (f", re-dispatched {s['redispatches']}x" if s.get("redispatches") else ""),
                              style="dim"))
        rows = _client_rows(dep, state.targets(dep_id))
        table = Table("client", "DP", "state", "progress", "blocks", "reason", box=None, padding=(0, 1),
                      show_edge=False)
        for name, dp, cstate, got, reason in rows[:MAX_CLIENT_ROWS]:
            total = blocks_total or max(got, 1)
            if cstate == "finished":
                got = total
            table.add_row(f"  {name}", dp, Text(cstate, style=STYLE.get(cstate, "")), _bar(got, total, 24),
                          f"{int(got)}/{int(total)}" if blocks_total else f"{int(got)}", reason[:60])
        if rows:
            parts.append(table)
        if len(rows) > MAX_CLIENT_ROWS:
            parts.append(Text(f"  ... and {len(rows) - MAX_CLIENT_ROWS} more client(s)", style="dim"))
    if not dep_ids:
        parts.append(Text("no open deployments (use --all, or name one)"))
    return Group(*parts), ended


def _client_rows(dep: dict[str, Any], targets: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, float, str]]:
    progress = dep.get("progress", {})
    results = dep.get("clients", {})
    if targets:
        return [(n, t.get("dp", ""), t.get("state", ""), float(progress.get(n, 0)), t.get("reason", ""))
                for n, t in sorted(targets.items())]
    rows = []
    for n in sorted(set(progress) | set(results)):
        r = results.get(n)
        st = ("finished" if r.get("outcome") == "done" else "failed") if r else "transferring"
        rows.append((n, dep.get("dp", ""), st, float(progress.get(n, 0)), (r or {}).get("reason", "")))
    return rows


def _pick(state: State, deployment: str | None, show_all: bool) -> list[str]:
    if deployment:
        state.get_deployment(deployment)  # unknown: NotFoundError, one line
        return [deployment]
    deps = state.list_deployments(20)
    return [d["id"] for d in deps if show_all or d.get("state") not in TERMINAL]


def run(state: State, console: Console, deployment: str | None, interval: float = 1.0, once: bool = False,
        show_all: bool = False) -> int:
    """Draw until every shown deployment ended (or once); Ctrl-C leaves with exit code 0."""
    ids = _pick(state, deployment, show_all)
    if once:
        group, _ = frame(state, ids)
        console.print(group)
        return 0
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                if not deployment:
                    ids = sorted(set(ids) | set(_pick(state, None, show_all)), reverse=True)
                group, ended = frame(state, ids)
                live.update(group, refresh=True)
                if ended and ids:
                    return 0
                time.sleep(interval)
    except KeyboardInterrupt:
        console.print("[dim]stopped watching (the deployments go on)[/]")
        return 0
