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
    {p}:idempotency:{key}           string: deployment id made by that trigger key
    {p}:session:{id}:lease          string: "dp-name:fence" held by the DP running the session
    {p}:fence                       counter for lease fencing numbers
    {p}:alloc                       counter for group/port allocation
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
