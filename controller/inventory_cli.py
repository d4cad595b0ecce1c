"""``mcdeploy client|collection|boundary``: the operator's commands for the site's machines.

Server side.  Errors are :class:`~mcproto.errors.McdeployError` (one line, exit 2 in ``mcdeploy``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from controller.inventory import Inventory


def run(args: argparse.Namespace, state: Any, console: Console) -> int:
    inv = Inventory(state)
    if args.cmd == "client":
        return _client(args, inv, console)
    if args.cmd == "collection":
        return _collection(args, inv, console)
    return _boundary(args, inv, console)


def _client(args: argparse.Namespace, inv: Inventory, console: Console) -> int:
    cmd = args.client_cmd
    if cmd == "add":
        new = inv.add_client(args.name, args.mac, args.smbios_uuid, args.ip, args.collection)
        rec = inv.get_client(args.name)
        console.print(f"client {args.name} {'added' if new else 'already known (unchanged)'}: MAC "
                      f"{rec.get('mac') or '-'}, SMBIOS UUID {rec.get('smbios_uuid') or '-'}"
                      + (f", address {rec['address']}" if rec.get("address") else "")
                      + (f", in {', '.join(rec['collections'])}" if rec["collections"] else ""))
        return 0
    if cmd == "show":
        console.print_json(json.dumps(inv.get_client(args.name)))
        return 0
    if cmd == "remove":
        inv.remove_client(args.name)
        console.print(f"client {args.name} removed")
        return 0
    if cmd == "import":
        rows, new, colls = inv.import_csv(args.file, args.collection)
        console.print(f"imported {rows} client(s) from {args.file}: {new} new, {rows - new} already known"
                      + (f"; collection(s) {', '.join(colls)}" if colls else ""))
        return 0
    clients = inv.list_clients()
    if args.json:
        print(json.dumps(clients))
        return 0
    table = Table("client", "MAC", "SMBIOS UUID", "address", "collections")
    for c in clients:
        table.add_row(c["name"], c.get("mac") or "-", c.get("smbios_uuid") or "-", c.get("address") or "-",
                      ", ".join(c["collections"]))
    console.print(table)
    return 0


def _collection(args: argparse.Namespace, inv: Inventory, console: Console) -> int:
    cmd = args.collection_cmd
    if cmd == "create":
        created = inv.create_collection(args.name)
        console.print(f"collection {args.name} {'created' if created else 'already exists'}")
        return 0
    if cmd == "add":
        n = inv.add_members(args.name, args.clients)
        console.print(f"collection {args.name}: {n} client(s) added ({len(inv.members(args.name))} in all)")
        return 0
    if cmd == "remove":
        n = inv.remove_members(args.name, args.clients)
        console.print(f"collection {args.name}: {n} client(s) removed ({len(inv.members(args.name))} left)")
        return 0
    if cmd == "delete":
        inv.delete_collection(args.name)
        console.print(f"collection {args.name} deleted (its clients stay)")
        return 0
    if cmd == "import":
        rows, new, _ = inv.import_csv(args.file, args.name)
        console.print(f"imported {rows} client(s) from {args.file} into collection {args.name}: {new} new")
        return 0
    if cmd == "show":
        members = [inv.get_client(n) for n in inv.members(args.name)]
        if args.json:
            print(json.dumps({"name": args.name, "clients": members}))
            return 0
        table = Table("client", "MAC", "SMBIOS UUID", "address")
        for c in members:
            table.add_row(c["name"], c.get("mac") or "-", c.get("smbios_uuid") or "-", c.get("address") or "-")
        console.print(f"collection {args.name}: {len(members)} client(s)")
        console.print(table)
        return 0
    colls = inv.list_collections()
    if args.json:
        print(json.dumps(colls))
        return 0
    table = Table("collection", "clients")
    for c in colls:
        table.add_row(c["name"], str(c["clients"]))
    console.print(table)
    return 0


def _boundary(args: argparse.Namespace, inv: Inventory, console: Console) -> int:
    cmd = args.boundary_cmd
    if cmd == "add":
        subnets = [s for part in args.subnet for s in part.split(",") if s.strip()]
        dps = [d.strip() for d in args.dp.split(",") if d.strip()]
        created = inv.add_boundary(args.name, subnets, dps)
        console.print(f"boundary {args.name} {'added' if created else 'already exists (unchanged)'}: "
                      f"{', '.join(subnets)} -> {' then '.join(dps)}")
        return 0
    if cmd == "remove":
        inv.remove_boundary(args.name)
        console.print(f"boundary {args.name} removed")
        return 0
    groups = inv.list_boundaries()
    if args.json:
        print(json.dumps(groups))
        return 0
    table = Table("boundary", "subnets", "DPs (fallback order)")
    for b in groups:
        table.add_row(b["name"], ", ".join(b["subnets"]), " → ".join(b["dps"]))
    console.print(table)
    return 0
