"""The site's machines: clients (by MAC and SMBIOS UUID), collections, boundary groups.

Server side.  Every operation validates everything first and writes in one
Redis transaction (watching the keys it checked), so a bad request or a CSV
with a bad row changes nothing, and repeating a request is a no-op:

* a **client** is a name with a MAC and/or an SMBIOS UUID (each identity belongs
  to one client) and, once seen or when given, its last-known address;
* a **collection** is a named set of clients, the target of a deployment;
* a **boundary group** maps client subnets (IPv4 and IPv6 CIDRs, never
  overlapping another group's) to DPs in fallback order.
"""

from __future__ import annotations

import csv
import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Any

import redis

from clientagent.identity import normalize_mac, normalize_uuid
from mcproto.errors import ConfigError, NotFoundError
from mcsite.state import State, _hash, _s

NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")
MAX_CSV_ROWS = 100_000


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ConfigError(f"bad {kind} name {name!r}: use 1-128 letters, digits, '.', '_', '@' or '-'")
    return name


def check_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ConfigError(f"not an IP address: {text!r}") from None


@dataclass(frozen=True)
class ClientSpec:
    name: str
    mac: str | None
    smbios_uuid: str | None
    address: str | None = None

    def record(self) -> dict[str, str]:
        return {"name": self.name, "mac": self.mac or "", "smbios_uuid": self.smbios_uuid or "",
                **({"address": self.address} if self.address else {})}


def client_spec(name: str, mac: str | None, smbios_uuid: str | None, address: str | None = None) -> ClientSpec:
    """A validated client; ConfigError with a one-line reason."""
    check_name("client", name)
    mac = mac.strip() if mac else None
    smbios_uuid = smbios_uuid.strip() if smbios_uuid else None
    if not mac and not smbios_uuid:
        raise ConfigError(f"client {name}: give a MAC address or an SMBIOS UUID (or both)")
    try:
        return ClientSpec(name, normalize_mac(mac) if mac else None,
                          normalize_uuid(smbios_uuid) if smbios_uuid else None,
                          check_address(address) if address else None)
    except ValueError as exc:
        raise ConfigError(f"client {name}: {exc}") from None


class Inventory:
    """Clients, collections and boundary groups in the site's Redis."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.r = state.r
        self.k = state.k

    # ------------------------------------------------------------------ clients

    def get_client(self, name: str) -> dict[str, Any]:
        raw = self.r.hgetall(self.k.client(name))
        if not raw:
            raise NotFoundError(f"unknown client {name!r} (see `mcdeploy client list`)")
        rec: dict[str, Any] = _hash(raw)
        rec["collections"] = sorted(_s(c) for c in self.r.smembers(self.k.client_collections(name)))
        return rec

    def list_clients(self) -> list[dict[str, Any]]:
        return [self.get_client(n) for n in sorted(_s(x) for x in self.r.smembers(self.k.clients_all))]

    def _conflicts(self, pipe: Any, specs: list[ClientSpec]) -> list[str]:
        """Why each spec cannot be written next to what exists (same name other identity, identity taken)."""
        problems = []
        for spec in specs:
            old = _hash(pipe.hgetall(self.k.client(spec.name)))
            same = (old.get("mac", ""), old.get("smbios_uuid", "")) == (spec.mac or "", spec.smbios_uuid or "")
            if old and not same:
                problems.append(f"client {spec.name} already exists with MAC {old.get('mac') or '-'}, UUID "
                                f"{old.get('smbios_uuid') or '-'} (remove it first to change it)")
                continue
            for label, value, key in (("MAC", spec.mac, self.k.client_by_mac),
                                      ("SMBIOS UUID", spec.smbios_uuid, self.k.client_by_uuid)):
                if value:
                    owner = pipe.get(key(value))
                    if owner is not None and _s(owner) != spec.name:
                        problems.append(f"{label} {value} of {spec.name} already belongs to client {_s(owner)}")
        return problems

    def _write_clients(self, specs: list[ClientSpec], memberships: list[tuple[str, str]],
                       locate: dict[str, str] | None = None) -> int:
        """Write clients and (collection, client) memberships in one watched transaction.

        ``locate``: client name -> where it came from (e.g. "line 4"), for error messages.
        Returns how many clients were new.
        """
        keys = [self.k.client(s.name) for s in specs]
        keys += [self.k.client_by_mac(s.mac) for s in specs if s.mac]
        keys += [self.k.client_by_uuid(s.smbios_uuid) for s in specs if s.smbios_uuid]
        for _ in range(5):
            with self.r.pipeline() as p:
                try:
                    p.watch(*keys)
                    problems = self._conflicts(p, specs)
                    if problems:
                        where = locate or {}
                        raise ConfigError("; ".join(
                            f"{where[s]}: {msg}" if (s := _subject(msg)) in where else msg for msg in problems))
                    new = sum(1 for s in specs if not p.exists(self.k.client(s.name)))
                    now = f"{time.time():.3f}"
                    p.multi()
                    for s in specs:
                        p.hsetnx(self.k.client(s.name), "added_at", now)
                        p.hset(self.k.client(s.name), mapping=s.record())
                        p.sadd(self.k.clients_all, s.name)
                        if s.mac:
                            p.set(self.k.client_by_mac(s.mac), s.name)
                        if s.smbios_uuid:
                            p.set(self.k.client_by_uuid(s.smbios_uuid), s.name)
                    for coll, name in memberships:
                        p.hsetnx(self.k.collection(coll), "name", coll)
                        p.hsetnx(self.k.collection(coll), "created_at", now)
                        p.sadd(self.k.collections, coll)
                        p.sadd(self.k.members(coll), name)
                        p.sadd(self.k.client_collections(name), coll)
                    p.execute()
                    return new
                except redis.WatchError:
                    continue
        raise ConfigError("the client records kept changing while writing; try again")

    def add_client(self, name: str, mac: str | None, smbios_uuid: str | None, address: str | None = None,
                   collection: str | None = None) -> bool:
        """Add one client (idempotent: the same identity again is fine); returns whether it was new."""
        spec = client_spec(name, mac, smbios_uuid, address)
        members = []
        if collection:
            self._need_collection(collection)
            members = [(collection, spec.name)]
        return self._write_clients([spec], members) == 1

    def set_address(self, name: str, address: str) -> None:
        self.get_client(name)
        self.r.hset(self.k.client(name), "address", check_address(address))

    def remove_client(self, name: str) -> None:
        rec = self.get_client(name)
        with self.r.pipeline() as p:
            for coll in rec["collections"]:
                p.srem(self.k.members(coll), name)
            p.delete(self.k.client(name), self.k.client_collections(name))
            if rec.get("mac"):
                p.delete(self.k.client_by_mac(rec["mac"]))
            if rec.get("smbios_uuid"):
                p.delete(self.k.client_by_uuid(rec["smbios_uuid"]))
            p.srem(self.k.clients_all, name)
            p.execute()

    def import_csv(self, path: str, collection: str | None = None) -> tuple[int, int, list[str]]:
        """Import clients from a CSV (name,mac,uuid[,collection]; a header line is optional).

        Every row is checked first; any bad row (reported with its line number) means nothing is
        imported.  ``collection``: put every row into it as well.  Returns (rows, new clients,
        collections named).
        """
        if collection:
            check_name("collection", collection)
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.reader(fh))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(f"{path} is not a UTF-8 CSV file: {exc}") from None
        if len(rows) > MAX_CSV_ROWS:
            raise ConfigError(f"{path}: {len(rows)} rows, at most {MAX_CSV_ROWS} per import")
        errors: list[str] = []
        specs: dict[str, ClientSpec] = {}
        where: dict[str, str] = {}
        seen: dict[str, str] = {}
        members: list[tuple[str, str]] = []
        for lineno, row in enumerate(rows, 1):
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if lineno == 1 and cells[0].lower() == "name":
                continue  # header
            if len(cells) < 3 or len(cells) > 4:
                errors.append(f"line {lineno}: expected name,mac,uuid[,collection], got {len(cells)} column(s)")
                continue
            try:
                spec = client_spec(cells[0], cells[1] or None, cells[2] or None)
                colls = [c for c in (cells[3] if len(cells) == 4 else "", collection or "") if c]
                for c in colls:
                    check_name("collection", c)
            except ConfigError as exc:
                errors.append(f"line {lineno}: {exc}")
                continue
            if spec.name in specs and specs[spec.name] != spec:
                errors.append(f"line {lineno}: client {spec.name} appears again with another identity "
                              f"(first at {where[spec.name]})")
                continue
            dup = next((f"{label} {v} is also on {seen[v]}" for label, v in (("MAC", spec.mac),
                        ("SMBIOS UUID", spec.smbios_uuid)) if v and seen.get(v, spec.name) != spec.name), None)
            if dup:
                errors.append(f"line {lineno}: {dup}")
                continue
            for v in (spec.mac, spec.smbios_uuid):
                if v:
                    seen[v] = spec.name
            specs.setdefault(spec.name, spec)
            where.setdefault(spec.name, f"line {lineno}")
            members += [(c, spec.name) for c in colls]
        if errors:
            raise ConfigError(f"{path}: {len(errors)} bad row(s), nothing imported: " + "; ".join(errors))
        if not specs:
            raise ConfigError(f"{path}: no client rows (expected name,mac,uuid[,collection])")
        try:
            new = self._write_clients(list(specs.values()), members, where)
        except ConfigError as exc:
            raise ConfigError(f"{path}: nothing imported: {exc}") from None
        return len(specs), new, sorted({c for c, _ in members})

    # ------------------------------------------------------------------ collections

    def _need_collection(self, name: str) -> None:
        if not self.r.exists(self.k.collection(name)):
            known = ", ".join(sorted(_s(c) for c in self.r.smembers(self.k.collections))) or "none"
            raise NotFoundError(f"unknown collection {name!r} (known: {known})")

    def create_collection(self, name: str) -> bool:
        check_name("collection", name)
        with self.r.pipeline() as p:
            p.hsetnx(self.k.collection(name), "name", name)
            p.hsetnx(self.k.collection(name), "created_at", f"{time.time():.3f}")
            p.sadd(self.k.collections, name)
            return bool(p.execute()[0])

    def members(self, name: str) -> list[str]:
        self._need_collection(name)
        return sorted(_s(m) for m in self.r.smembers(self.k.members(name)))

    def list_collections(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(_s(c) for c in self.r.smembers(self.k.collections)):
            rec: dict[str, Any] = _hash(self.r.hgetall(self.k.collection(name)))
            rec["clients"] = int(self.r.scard(self.k.members(name)))
            out.append(rec)
        return out

    def add_members(self, name: str, clients: list[str]) -> int:
        """Add existing clients to a collection (all or none); returns how many were new members."""
        self._need_collection(name)
        unknown = [c for c in clients if not self.r.exists(self.k.client(c))]
        if unknown:
            raise NotFoundError(f"unknown client(s) {', '.join(unknown)}: add them first (`mcdeploy client add` "
                                "or `client import`); nothing added")
        with self.r.pipeline() as p:
            p.sadd(self.k.members(name), *clients)
            for c in clients:
                p.sadd(self.k.client_collections(c), name)
            return int(p.execute()[0])

    def remove_members(self, name: str, clients: list[str]) -> int:
        self._need_collection(name)
        with self.r.pipeline() as p:
            p.srem(self.k.members(name), *clients)
            for c in clients:
                p.srem(self.k.client_collections(c), name)
            return int(p.execute()[0])

    def delete_collection(self, name: str) -> None:
        members = self.members(name)
        with self.r.pipeline() as p:
            for c in members:
                p.srem(self.k.client_collections(c), name)
            p.delete(self.k.collection(name), self.k.members(name))
            p.srem(self.k.collections, name)
            p.execute()

    # ------------------------------------------------------------------ boundary groups

    def list_boundaries(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(_s(b) for b in self.r.smembers(self.k.boundaries)):
            rec = _hash(self.r.hgetall(self.k.boundary(name)))
            if rec:
                out.append({"name": name, "subnets": rec["subnets"].split(","), "dps": rec["dps"].split(",")})
        return out

    def add_boundary(self, name: str, subnets: list[str], dps: list[str]) -> bool:
        """Map subnets to DPs (fallback order); refused if a subnet overlaps any group's.  Returns created."""
        check_name("boundary group", name)
        nets = []
        for text in subnets:
            try:
                nets.append(ipaddress.ip_network(text.strip(), strict=True))
            except ValueError as exc:
                raise ConfigError(f"boundary {name}: bad subnet {text!r}: {exc}") from None
        if not nets:
            raise ConfigError(f"boundary {name}: give at least one --subnet CIDR")
        if not dps:
            raise ConfigError(f"boundary {name}: give at least one --dp")
        for i, a in enumerate(nets):
            for b in nets[i + 1:]:
                if a.version == b.version and a.overlaps(b):
                    raise ConfigError(f"boundary {name}: subnets {a} and {b} overlap")
        known = {n for n, _ in self.state.list_dps()}
        unknown = [d for d in dps if d not in known]
        if unknown:
            raise NotFoundError(f"boundary {name}: unknown DP(s) {', '.join(unknown)} "
                                f"(known: {', '.join(sorted(known)) or 'none registered'})")
        if len(set(dps)) != len(dps):
            raise ConfigError(f"boundary {name}: a DP is named twice in --dp")
        rec = {"name": name, "subnets": ",".join(str(n) for n in nets), "dps": ",".join(dps)}
        with self.r.pipeline() as p:
            p.watch(self.k.boundaries, self.k.boundary(name))
            existing = _hash(p.hgetall(self.k.boundary(name)))
            if existing:
                if existing.get("subnets") == rec["subnets"] and existing.get("dps") == rec["dps"]:
                    return False
                raise ConfigError(f"boundary {name} already exists ({existing.get('subnets')} -> "
                                  f"{existing.get('dps')}); remove it first to change it")
            for other in self.list_boundaries():
                for theirs in other["subnets"]:
                    t = ipaddress.ip_network(theirs)
                    for mine in nets:
                        if mine.version == t.version and mine.overlaps(t):
                            raise ConfigError(f"boundary {name}: subnet {mine} overlaps {t} of boundary "
                                              f"{other['name']}")
            p.multi()
            p.hset(self.k.boundary(name), mapping=rec)
            p.sadd(self.k.boundaries, name)
            try:
                p.execute()
            except redis.WatchError:
                raise ConfigError("boundary groups changed meanwhile; try again") from None
        return True

    def remove_boundary(self, name: str) -> None:
        if not self.r.exists(self.k.boundary(name)):
            raise NotFoundError(f"unknown boundary {name!r}")
        with self.r.pipeline() as p:
            p.delete(self.k.boundary(name))
            p.srem(self.k.boundaries, name)
            p.execute()

    def boundary_of(self, address: str) -> dict[str, Any] | None:
        """The boundary group whose subnet holds ``address`` (the most specific one), or None."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        best: tuple[int, dict[str, Any]] | None = None
        for b in self.list_boundaries():
            for net in b["subnets"]:
                n = ipaddress.ip_network(net)
                if ip.version == n.version and ip in n and (best is None or n.prefixlen > best[0]):
                    best = (n.prefixlen, b)
        return best[1] if best else None


def _subject(problem: str) -> str:
    """The client a conflict message is about (its 'client NAME' or '... of NAME ...')."""
    m = re.match(r"client (\S+) already exists", problem) or re.search(r" of (\S+) already belongs", problem)
    return m.group(1) if m else ""
