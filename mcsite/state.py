"""The site's state in Redis: images, DPs, deployments and per-client results.

Server side only.  Redis state is the truth; Celery messages are hints that
may arrive twice.  So every write here is idempotent: an image added twice is
one image, a trigger with the same idempotency key makes one deployment, a
client's first terminal result wins and counters move only when a result is
new (one Lua script does check-and-count atomically).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgpack
import redis

from mcproto.errors import ConfigError, NotFoundError
from mcproto.messages import ClientResult, DeployRequest, ImageRef, SessionJob, SessionReport, Tier
from mcsite.keys import Keys
from mcsite.settings import ControllerSettings

_ORDER = {"created": 0, "waiting": 1, "transferring": 2, "finished": 3, "failed": 3, "cancelled": 3}

# KEYS: clients hash, deployment hash.  ARGV: client id, packed result, outcome, now.
# Records a client's first terminal result; counts it; finishes the deployment
# when every expected client is accounted for.  Returns 1 if the result was new.
_RECORD_RESULT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local field = ARGV[3] == 'done' and 'clients_done' or 'clients_failed'
redis.call('HINCRBY', KEYS[2], field, 1)
local expected = tonumber(redis.call('HGET', KEYS[2], 'expected') or '0')
local done = tonumber(redis.call('HGET', KEYS[2], 'clients_done') or '0')
local failed = tonumber(redis.call('HGET', KEYS[2], 'clients_failed') or '0')
local state = redis.call('HGET', KEYS[2], 'state')
if expected > 0 and done + failed >= expected and state ~= 'finished' and state ~= 'failed'
   and state ~= 'cancelled' then
  redis.call('HSET', KEYS[2], 'state', failed > 0 and 'failed' or 'finished',
             'finished_at', ARGV[4], 'reason', failed > 0 and (failed .. ' client(s) failed') or '')
end
return 1
"""

# KEYS: deployment hash.  ARGV: new state, order of new state, now, then field/value pairs.
# Moves the deployment's state only forward, and never out of a terminal state.
_ADVANCE = """
local order = {created=0, waiting=1, transferring=2, finished=3, failed=3, cancelled=3}
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return 0 end
if (order[cur] or 0) >= 3 or (order[cur] or 0) >= tonumber(ARGV[2]) then
  if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], ARGV[1] .. '_at', ARGV[3])
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
return 1
"""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in raw.items()}


class State:
    """Typed access to the site's Redis state."""

    def __init__(self, client: redis.Redis, prefix: str = "mcd") -> None:
        self.r = client
        self.k = Keys(prefix)
        self._record = self.r.register_script(_RECORD_RESULT)
        self._advance = self.r.register_script(_ADVANCE)

    @classmethod
    def from_url(cls, url: str, prefix: str = "mcd") -> State:
        return cls(redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30), prefix)

    def ping(self) -> None:
        try:
            self.r.ping()
        except redis.RedisError as exc:
            raise ConfigError(f"cannot reach Redis: {exc}") from None

    # ------------------------------------------------------------------ images

    def add_image(self, name: str, path: str, size: int, sha256: str, manifest: str = "") -> dict[str, str]:
        """Record an image; the same content again is a no-op, different content is refused.

        ``manifest``: the controller-signed manifest, base64 (see :mod:`mcproto.manifest`).
        """
        existing = self.r.hgetall(self.k.image(name))
        if existing:
            rec = _hash(existing)
            if rec["sha256"] == sha256 and rec["path"] == path:
                if manifest and not rec.get("manifest"):
                    self.set_image_manifest(name, manifest)
                    rec["manifest"] = manifest
                return rec
            raise ConfigError(f"an image named {name!r} already exists with other content; "
                              "choose another --name")
        rec = {"name": name, "path": path, "size": str(size), "sha256": sha256,
               "added_at": f"{time.time():.3f}", "manifest": manifest}
        with self.r.pipeline() as p:
            p.hset(self.k.image(name), mapping=rec)
            p.sadd(self.k.images, name)
            p.execute()
        return rec

    def set_image_manifest(self, name: str, manifest: str) -> None:
        self.r.hset(self.k.image(name), "manifest", manifest)

    def get_image(self, name: str) -> dict[str, str]:
        raw = self.r.hgetall(self.k.image(name))
        if not raw:
            known = ", ".join(sorted(_s(n) for n in self.r.smembers(self.k.images))) or "none"
            raise NotFoundError(f"unknown image {name!r} (known: {known})")
        return _hash(raw)

    def list_images(self) -> list[dict[str, str]]:
        names = sorted(_s(n) for n in self.r.smembers(self.k.images))
        return [self.get_image(n) for n in names]

    # ------------------------------------------------------------------ distribution points

    def register_dp(self, name: str, info: dict[str, Any], ttl: float) -> None:
        """DP heartbeat: the registration expires unless renewed."""
        key = self.k.dp(name)
        with self.r.pipeline() as p:
            p.hset(key, mapping={**{k: str(v) for k, v in info.items()}, "seen_at": f"{time.time():.3f}"})
            p.pexpire(key, int(ttl * 1000))
            p.sadd(self.k.dps, name)
            p.execute()

    def get_dp(self, name: str) -> dict[str, str] | None:
        raw = self.r.hgetall(self.k.dp(name))
        return _hash(raw) if raw else None

    def list_dps(self) -> list[tuple[str, dict[str, str] | None]]:
        return [(n, self.get_dp(n)) for n in sorted(_s(x) for x in self.r.smembers(self.k.dps))]

    # ------------------------------------------------------------------ deployments

    def create_deployment(self, image: dict[str, str], req: DeployRequest, ctl: ControllerSettings
                          ) -> tuple[str, SessionJob, bool]:
        """Create a deployment and its session job; returns (id, job, created_now).

        With an idempotency key, a second call returns the first deployment.
        """
        dep_id = f"d-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        dp, expected = req.dp, req.clients
        if req.idempotency_key:
            key = self.k.idempotency(req.idempotency_key)
            if not self.r.set(key, dep_id, nx=True):
                existing = _s(self.r.get(key))
                return existing, self.session_job(existing), False
        streams = 3 if req.slow_policy == "tier" else 1
        n = int(self.r.incrby(self.k.alloc, streams)) - streams

        def allocate(i: int) -> tuple[str, int]:
            port = ctl.port_min + (n + i) % (ctl.port_max - ctl.port_min + 1)
            if ":" in ctl.group_prefix:  # IPv6, e.g. ff15::77: -> ff15::77:1 .. ff15::77:ffff
                return f"{ctl.group_prefix}{1 + (n + i) % 0xFFFF:x}", port
            return f"{ctl.group_prefix}{1 + (n + i) % 254}", port

        group, port = allocate(0)
        rate = req.max_rate_mbps or ctl.default_rate_mbps
        tiers = [Tier(group=g, port=p, max_rate_mbps=rate * f)
                 for (g, p), f in ((allocate(1), 1 / 3), (allocate(2), 1 / 10))] if streams > 1 else []
        job = SessionJob(
            deployment=dep_id, session_id=secrets.randbits(63) or 1, dp=dp,
            image=ImageRef(name=image["name"], path=image["path"], size=int(image["size"]),
                           sha256=image["sha256"], manifest=image.get("manifest", "")),
            group=group, port=port, expected_clients=expected, start_timeout_s=req.start_timeout_s,
            start_clients=req.start_clients, start_at=req.start_at, max_rate_mbps=req.max_rate_mbps,
            slow_policy=req.slow_policy, drop_below_mbps=req.drop_below_mbps, min_rate_mbps=req.min_rate_mbps,
            slow_grace_s=req.slow_grace_s, unicast_fallback=req.unicast_fallback, tiers=tiers,
            encrypt=req.encrypt,
        )
        now = f"{time.time():.3f}"
        rec = {"id": dep_id, "image": image["name"], "dp": dp, "expected": str(expected),
               "state": "created", "created_at": now, "clients_done": "0", "clients_failed": "0",
               "session_id": str(job.session_id), "group": group, "port": str(port),
               "job": msgpack.packb(job.model_dump(mode="json"))}
        with self.r.pipeline() as p:
            p.hset(self.k.deployment(dep_id), mapping=rec)
            p.zadd(self.k.deployments, {dep_id: time.time()})
            p.execute()
        return dep_id, job, True

    def session_job(self, dep_id: str) -> SessionJob:
        raw = self.r.hget(self.k.deployment(dep_id), "job")
        if raw is None:
            raise NotFoundError(f"unknown deployment {dep_id!r}")
        return SessionJob.model_validate(msgpack.unpackb(raw))

    def record_session_report(self, rep: SessionReport) -> bool:
        """Advance the deployment's state from a DP report; repeated reports change nothing."""
        key = self.k.deployment(rep.deployment)
        fields: list[str] = ["bytes_sent", str(rep.bytes_sent), "clients_joined", str(rep.clients_joined),
                             "session_state", rep.state]
        if rep.reason:
            fields += ["reason", rep.reason]
        state = rep.state
        if state == "finished":
            expected = int(self.r.hget(key, "expected") or 0)
            if rep.clients_failed or (expected and rep.clients_done < expected):
                state = "failed"
                if not rep.reason:
                    missing = max(0, expected - rep.clients_done - rep.clients_failed)
                    fields += ["reason", f"{rep.clients_failed} failed, {missing} never reported"]
        return bool(self._advance(keys=[key], args=[state, _ORDER[state], f"{time.time():.3f}", *fields]))

    def record_client_result(self, res: ClientResult) -> bool:
        """Record a client's terminal result once; returns whether it was new."""
        if not self.r.exists(self.k.deployment(res.deployment)):
            raise NotFoundError(f"result for unknown deployment {res.deployment!r}")
        packed = msgpack.packb({**res.model_dump(mode="json"), "recorded_at": time.time()})
        return bool(self._record(keys=[self.k.clients(res.deployment), self.k.deployment(res.deployment)],
                                 args=[res.client_id, packed, res.outcome, f"{time.time():.3f}"]))

    def set_progress(self, dep_id: str, progress: dict[str, int]) -> None:
        """Volatile per-client progress (blocks received), written by the DP."""
        if not progress:
            return
        key = self.k.progress(dep_id)
        with self.r.pipeline() as p:
            p.hset(key, mapping={k: str(v) for k, v in progress.items()})
            p.expire(key, 24 * 3600)
            p.execute()

    def get_deployment(self, dep_id: str) -> dict[str, Any]:
        raw = self.r.hgetall(self.k.deployment(dep_id))
        if not raw:
            raise NotFoundError(f"unknown deployment {dep_id!r}")
        rec: dict[str, Any] = {_s(k): _s(v) for k, v in raw.items() if _s(k) != "job"}
        results = {_s(k): msgpack.unpackb(v) for k, v in self.r.hgetall(self.k.clients(dep_id)).items()}
        progress = {_s(k): int(v) for k, v in self.r.hgetall(self.k.progress(dep_id)).items()}
        rec["clients"] = results
        rec["progress"] = progress
        return rec

    def list_deployments(self, limit: int = 50) -> list[dict[str, Any]]:
        ids = [_s(x) for x in self.r.zrevrange(self.k.deployments, 0, limit - 1)]
        out = []
        for dep_id in ids:
            raw = self.r.hgetall(self.k.deployment(dep_id))
            if raw:
                out.append({_s(k): _s(v) for k, v in raw.items() if _s(k) != "job"})
        return out

    def acquire_lease(self, session_id: int, holder: str, ttl: float) -> int | None:
        """Take the session's lease for ``holder``; returns its fencing number, or None if held."""
        fence = int(self.r.incr(self.k.fence))
        if self.r.set(self.k.lease(session_id), f"{holder}:{fence}", nx=True, px=int(ttl * 1000)):
            return fence
        return None

    def renew_lease(self, session_id: int, holder: str, fence: int, ttl: float) -> bool:
        key = self.k.lease(session_id)
        if _s(self.r.get(key) or b"") != f"{holder}:{fence}":
            return False
        return bool(self.r.pexpire(key, int(ttl * 1000)))

    def release_lease(self, session_id: int, holder: str, fence: int) -> None:
        key = self.k.lease(session_id)
        if _s(self.r.get(key) or b"") == f"{holder}:{fence}":
            self.r.delete(key)
