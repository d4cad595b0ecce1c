"""``mcdeploy dp list|show|drain|undrain|set``: distribution points as the operator sees them.

Server side.  A DP agent registers itself with every heartbeat (a hash with a TTL of three heartbeats:
name, control address, interfaces, the site's multicast group and port ranges, capacity, sessions,
rate, version, identity).  The operator's settings of a DP (drained, max rate, max clients) live in a
separate hash without TTL and take effect without restarting anything: the controller reads them when
it maps clients to DPs, the DP when it opens each session.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from mcproto.errors import ConfigError, NotFoundError
from mcsite.state import State


def _view(state: State, name: str) -> dict[str, Any]:
    if name not in {n for n, _ in state.list_dps()}:
        known = ", ".join(n for n, _ in state.list_dps()) or "none registered"
        raise NotFoundError(f"unknown DP {name!r} (known: {known})")
    return state.dp_view(name)


def run(args: argparse.Namespace, state: State, console: Console) -> int:
    if args.dp_cmd == "list":
        views = [state.dp_view(n) for n, _ in state.list_dps()]
        if args.json:
            print(json.dumps(views))
            return 0
        from rich.table import Column

        widest = max((len(v["name"]) for v in views), default=2)
        table = Table(Column("DP", no_wrap=True, min_width=widest), "alive", "drained", "control", "sessions",
                      "max rate", "version", Column("identity (--dp-key)", overflow="fold"))
        for v in views:
            reg, cfg = v["registration"], v["config"]
            rate = cfg.get("max_rate_mbps") or reg.get("max_rate_mbps", "-")
            table.add_row(v["name"], "yes" if v["alive"] else "[red]no[/]", "[yellow]yes[/]" if v["drained"] else "no",
                          reg.get("control", "-"), f"{reg.get('sessions', '-')}/{reg.get('concurrency', '-')}",
                          f"{rate}" + (" (set)" if cfg.get("max_rate_mbps") else ""), reg.get("version", "-"),
                          reg.get("key_fingerprint", "-"))
        console.print(table)
        return 0
    if args.dp_cmd == "show":
        v = _view(state, args.name)
        if args.json:
            print(json.dumps(v))
            return 0
        reg, cfg = v["registration"], v["config"]
        console.print(f"DP [bold]{v['name']}[/]: {'alive' if v['alive'] else '[red]not alive (no heartbeat)[/]'}"
                      f"{', [yellow]drained[/]' if v['drained'] else ''}")
        for key in ("control", "hostname", "pid", "version", "mcast_interface", "mcast_interface6", "ttl",
                    "group_range", "port_range", "concurrency", "sessions", "max_rate_mbps", "encrypt",
                    "key_fingerprint", "bad_datagrams", "seen_at"):
            if key in reg:
                console.print(f"  {key}: {reg[key]}")
        if cfg:
            console.print("  settings: " + ", ".join(f"{k}={val}" for k, val in sorted(cfg.items())))
        table = Table("session", "deployment", "state", "group:port", "clients", "percent", "rate Mb/s")
        for s in v["sessions"]:
            table.add_row(f"{int(s['id']):x}", s.get("deployment", ""), s.get("state", ""),
                          f"{s.get('group')}:{s.get('port')}", s.get("clients", ""), s.get("live_percent", "-"),
                          s.get("live_rate_mbps", "-"))
        console.print(table)
        return 0
    if args.dp_cmd in ("drain", "undrain"):
        _view(state, args.name)
        state.set_dp_config(args.name, drained="1" if args.dp_cmd == "drain" else None)
        live = len(state.dp_view(args.name)["sessions"])
        if args.dp_cmd == "drain":
            console.print(f"DP {args.name} drained: it finishes its {live} live session(s) and gets no new ones")
        else:
            console.print(f"DP {args.name} undrained: it gets new sessions again")
        return 0
    if args.dp_cmd == "set":
        _view(state, args.name)
        fields: dict[str, str | None] = {}
        if args.max_rate is not None:
            if args.max_rate < 0:
                raise ConfigError("--max-rate must be >= 0")
            fields["max_rate_mbps"] = f"{args.max_rate:g}" if args.max_rate else None
        if args.max_clients is not None:
            if args.max_clients < 0:
                raise ConfigError("--max-clients must be >= 0")
            fields["max_clients"] = str(args.max_clients) if args.max_clients else None
        if not fields:
            raise ConfigError("nothing to set: give --max-rate and/or --max-clients")
        cfg = state.set_dp_config(args.name, **fields)
        console.print(f"DP {args.name}: " + (", ".join(f"{k}={v}" for k, v in sorted(cfg.items())
                                                       if k != "changed_at") or "agent defaults")
                      + " (applies to sessions opened from now on)")
        return 0
    return 2
