"""Every Redis key mcdeploy uses, in one place (as arq keeps its constants).

Server side only.  All writes to these keys are idempotent: a re-delivered
Celery message must change nothing.  ``p`` is the site's key prefix.

    {p}:images                      set of image names
    {p}:image:{name}                hash: name, path, size, sha256, added_at
    {p}:dps                         set of DP names ever registered
    {p}:dp:{name}                   hash: registration (address, version, seen_at); TTL = 3 heartbeats
    {p}:deployments                 zset of deployment ids by creation time
    {p}:deployment:{id}             hash: image, dp, expected, state, reason, timings, counters
    {p}:deployment:{id}:clients     hash: client_id -> msgpack ClientResult (first terminal result wins)
    {p}:deployment:{id}:progress    hash: client_id -> blocks received (volatile, from the DP)
    {p}:deployment:{id}:sessions    list of the deployment's session ids (one per DP per attempt)
    {p}:deployment:{id}:targets     hash: client name -> JSON target record (collection deployments: state,
                                    dp, session, attempt, reason, <state>_at timings, history of attempts)
    {p}:session:{id}                hash: deployment, dp, attempt, state, <state>_at, reason, clients, job
    {p}:idempotency:{key}           string: deployment id made by that trigger key
    {p}:clients                     set of client names
    {p}:client:{name}               hash: name, mac, smbios_uuid, address (last known), added_at, seen_at
    {p}:client-by-mac:{mac}         string: client name (a MAC belongs to one client)
    {p}:client-by-uuid:{uuid}       string: client name (an SMBIOS UUID belongs to one client)
    {p}:client:{name}:collections   set of collection names the client is in
    {p}:collections                 set of collection names
    {p}:collection:{name}           hash: name, created_at
    {p}:collection:{name}:members   set of client names
    {p}:boundaries                  set of boundary group names
    {p}:boundary:{name}             hash: name, subnets (comma list of CIDRs), dps (comma list, fallback order)
    {p}:session:{id}:lease          string: "dp-name:fence" held by the DP running the session
    {p}:fence                       counter for lease fencing numbers
    {p}:alloc                       counter for group/port allocation (where the next search starts)
    {p}:alloc:ports                 hash: data port -> "group session-id" of the live stream holding it
                                    (claimed at allocation, released when the session ends)
    {p}:sessions:live               set of session ids not yet finished, failed or cancelled (the reconciler's list)
    {p}:session:{id}:redispatch     string with a TTL: the reconciler re-dispatched the session this recently
    {p}:dp:{name}:config            hash: operator settings of a DP read per session, no TTL (drained, max_rate_mbps,
                                    max_clients)
    {p}:deployment:{id}:seen        hash: client name -> when the DP last reported its progress (Unix seconds)
    {p}:reconcile:lock              string with a TTL: one reconciler pass at a time
"""

from __future__ import annotations


class Keys:
    """Key builder bound to one prefix."""

    def __init__(self, prefix: str = "mcd") -> None:
        self.p = prefix

    @property
    def images(self) -> str:
        return f"{self.p}:images"

    def image(self, name: str) -> str:
        return f"{self.p}:image:{name}"

    @property
    def dps(self) -> str:
        return f"{self.p}:dps"

    def dp(self, name: str) -> str:
        return f"{self.p}:dp:{name}"

    @property
    def deployments(self) -> str:
        return f"{self.p}:deployments"

    def deployment(self, dep_id: str) -> str:
        return f"{self.p}:deployment:{dep_id}"

    def clients(self, dep_id: str) -> str:
        return f"{self.p}:deployment:{dep_id}:clients"

    def progress(self, dep_id: str) -> str:
        return f"{self.p}:deployment:{dep_id}:progress"

    def sessions(self, dep_id: str) -> str:
        return f"{self.p}:deployment:{dep_id}:sessions"

    def targets(self, dep_id: str) -> str:
        return f"{self.p}:deployment:{dep_id}:targets"

    def session(self, session_id: int | str) -> str:
        return f"{self.p}:session:{session_id}"

    @property
    def clients_all(self) -> str:
        return f"{self.p}:clients"

    def client(self, name: str) -> str:
        return f"{self.p}:client:{name}"

    def client_by_mac(self, mac: str) -> str:
        return f"{self.p}:client-by-mac:{mac}"

    def client_by_uuid(self, smbios_uuid: str) -> str:
        return f"{self.p}:client-by-uuid:{smbios_uuid}"

    def client_collections(self, name: str) -> str:
        return f"{self.p}:client:{name}:collections"

    @property
    def collections(self) -> str:
        return f"{self.p}:collections"

    def collection(self, name: str) -> str:
        return f"{self.p}:collection:{name}"

    def members(self, name: str) -> str:
        return f"{self.p}:collection:{name}:members"

    @property
    def boundaries(self) -> str:
        return f"{self.p}:boundaries"

    def boundary(self, name: str) -> str:
        return f"{self.p}:boundary:{name}"

    def idempotency(self, key: str) -> str:
        return f"{self.p}:idempotency:{key}"

    def lease(self, session_id: int) -> str:
        return f"{self.p}:session:{session_id}:lease"

    @property
    def fence(self) -> str:
        return f"{self.p}:fence"

    @property
    def alloc(self) -> str:
        return f"{self.p}:alloc"

    @property
    def alloc_ports(self) -> str:
        return f"{self.p}:alloc:ports"

    @property
    def live_sessions(self) -> str:
        return f"{self.p}:sessions:live"

    def redispatch(self, session_id: int | str) -> str:
        return f"{self.p}:session:{session_id}:redispatch"

    def dp_config(self, name: str) -> str:
        return f"{self.p}:dp:{name}:config"

    def seen(self, dep_id: str) -> str:
        return f"{self.p}:deployment:{dep_id}:seen"

    @property
    def reconcile_lock(self) -> str:
        return f"{self.p}:reconcile:lock"
