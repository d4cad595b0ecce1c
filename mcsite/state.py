"""The site's state in Redis: images, DPs, deployments and per-client results.

Server side only.  Redis state is the truth; Celery messages are hints that
may arrive twice.  So every write here is idempotent: an image added twice is
one image, a trigger with the same idempotency key makes one deployment, a
client's first terminal result wins and counters move only when a result is
new (one Lua script does check-and-count atomically).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import msgpack
import redis

from mcproto.errors import ConfigError, NotFoundError
from mcproto.messages import ClientResult, DeployRequest, ImageRef, SessionJob, SessionReport, Target, Tier
from mcsite.keys import Keys
from mcsite.settings import ControllerSettings

_ORDER = {"created": 0, "staging": 1, "waiting": 2, "transferring": 3, "finished": 4, "failed": 4,
          "cancelled": 4}
TERMINAL = ("finished", "failed", "cancelled")

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
  local final = failed > 0 and 'failed' or 'finished'
  redis.call('HSET', KEYS[2], 'state', final, final .. '_at', ARGV[4],
             'finished_at', ARGV[4], 'reason', failed > 0 and (failed .. ' client(s) failed') or '')
end
return 1
"""

# KEYS: deployment hash.  ARGV: new state, order of new state, now, then field/value pairs.
# Moves the deployment's state only forward, and never out of a terminal state.
_ADVANCE = """
local order = {created=0, staging=1, waiting=2, transferring=3, finished=4, failed=4, cancelled=4}
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return 0 end
if (order[cur] or 0) >= 4 or (order[cur] or 0) >= tonumber(ARGV[2]) then
  if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
  return 0
end
-- Reports may be handled out of order: a state skipped over is stamped with the same time.
local names = {'staging', 'waiting', 'transferring'}
for i, name in ipairs(names) do
  if i > (order[cur] or 0) and i < tonumber(ARGV[2]) then redis.call('HSETNX', KEYS[1], name .. '_at', ARGV[3]) end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], ARGV[1] .. '_at', ARGV[3])
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
return 1
"""

# Per-client states of a collection deployment (JSON records in the targets hash).
# KEYS: targets hash, deployment hash, results hash.
# ARGV: new state, now, reason, session filter ('' any), packed result ('' none), flags, joined estimate
# ('' none: for a result, when the client joined by its own clock), client names... (no names: every
# target).  Flags: 'j' move only clients that joined; 'J' mark them joined first.
# A client moves only forward, never out of a terminal state, and only while it belongs to the
# filtered session (a late message of an earlier attempt changes nothing).  Terminal moves are
# counted once; when every target is accounted for the deployment finishes (failed if any failed).
# Returns how many clients moved.
_TARGETS_MOVE = """
local order = {created=0, staging=1, waiting=2, transferring=3, finished=4, failed=4, cancelled=4}
local counter = {finished='clients_done', failed='clients_failed', cancelled='clients_cancelled'}
local new, now, reason, sess, packed, flags = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local joined = ARGV[7]
local names = {}
if #ARGV > 7 then
  for i = 8, #ARGV do names[#names + 1] = ARGV[i] end
else
  names = redis.call('HKEYS', KEYS[1])
end
local moved = 0
for _, name in ipairs(names) do
  local raw = redis.call('HGET', KEYS[1], name)
  if raw then
    local t = cjson.decode(raw)
    local changed = false
    if (sess == '' or t.session == sess) and (order[t.state] or 0) < 4 then
      if string.find(flags, 'J', 1, true) and not t.joined_at then
        t.joined_at = now
        changed = true
      end
      if order[new] > (order[t.state] or 0) and (not string.find(flags, 'j', 1, true) or t.joined_at) then
        if order[new] < 4 then
          for i, skipped in ipairs({'staging', 'waiting', 'transferring'}) do
            if i > (order[t.state] or 0) and i < order[new] and not t[skipped .. '_at'] then
              t[skipped .. '_at'] = now
            end
          end
        elseif joined ~= '' then  -- a result faster than the join reports: the client's own timing
          local floor = t.waiting_at or t.staging_at or t.created_at
          if not t.joined_at then
            t.joined_at = (floor and tonumber(floor) > tonumber(joined)) and floor or joined
          end
          if not t.transferring_at then t.transferring_at = t.joined_at end
          for _, skipped in ipairs({'staging', 'waiting'}) do
            if not t[skipped .. '_at'] then t[skipped .. '_at'] = t.joined_at end
          end
        end
        t.state = new
        t[new .. '_at'] = now
        if reason ~= '' then t.reason = reason end
        moved = moved + 1
        changed = true
        if counter[new] then
          redis.call('HINCRBY', KEYS[2], counter[new], 1)
          t.ended_at = now
          if packed ~= '' then redis.call('HSET', KEYS[3], name, packed) end
        end
      end
    end
    if changed then redis.call('HSET', KEYS[1], name, cjson.encode(t)) end
  end
end
local expected = tonumber(redis.call('HGET', KEYS[2], 'expected') or '0')
local done = tonumber(redis.call('HGET', KEYS[2], 'clients_done') or '0')
local failed = tonumber(redis.call('HGET', KEYS[2], 'clients_failed') or '0')
local cancelled = tonumber(redis.call('HGET', KEYS[2], 'clients_cancelled') or '0')
local state = redis.call('HGET', KEYS[2], 'state')
if moved > 0 and expected > 0 and done + failed + cancelled >= expected and (order[state] or 0) < 4 then
  local final = failed > 0 and 'failed' or (cancelled > 0 and 'cancelled' or 'finished')
  local why = ''
  if failed > 0 then why = failed .. ' of ' .. expected .. ' client(s) failed' end
  redis.call('HSET', KEYS[2], 'state', final, final .. '_at', now, 'finished_at', now, 'reason', why)
end
return moved
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
        self._targets_move = self.r.register_script(_TARGETS_MOVE)

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

    DP_CONFIG_FIELDS = ("drained", "max_rate_mbps", "max_clients")

    def dp_config(self, name: str) -> dict[str, str]:
        """The operator's settings of a DP (no TTL; read by the controller and by the DP per session)."""
        return _hash(self.r.hgetall(self.k.dp_config(name)))

    def set_dp_config(self, name: str, **fields: str | None) -> dict[str, str]:
        """Change a DP's settings at run time (None removes a field); the DP must have registered once."""
        if not self.r.sismember(self.k.dps, name):
            known = ", ".join(n for n, _ in self.list_dps()) or "none registered"
            raise NotFoundError(f"unknown DP {name!r} (known: {known})")
        bad = set(fields) - set(self.DP_CONFIG_FIELDS)
        if bad:
            raise ConfigError(f"unknown DP setting(s): {', '.join(sorted(bad))}")
        put = {k: v for k, v in fields.items() if v is not None}
        drop = [k for k, v in fields.items() if v is None]
        with self.r.pipeline() as p:
            if put:
                p.hset(self.k.dp_config(name), mapping={**put, "changed_at": f"{time.time():.3f}"})
            if drop:
                p.hdel(self.k.dp_config(name), *drop)
            p.execute()
        return self.dp_config(name)

    def dp_drained(self, name: str) -> bool:
        return _s(self.r.hget(self.k.dp_config(name), "drained") or b"") == "1"

    def dp_view(self, name: str) -> dict[str, Any]:
        """A DP as the operator sees it: registration (None fields when dead), settings, live sessions."""
        info = self.get_dp(name)
        cfg = self.dp_config(name)
        sessions = []
        for sid in self.live_sessions():
            rec = self.session(sid)
            if rec.get("dp") == name:
                sessions.append(rec)
        return {"name": name, "alive": info is not None, "drained": cfg.get("drained") == "1",
                "registration": info or {}, "config": cfg, "sessions": sessions}

    # ------------------------------------------------------------------ deployments

    def _allocate(self, ctl: ControllerSettings, streams: int, session_id: int) -> list[tuple[str, int]]:
        """``streams`` (group, port) pairs for ``session_id``, none in use by a live session.

        Central allocation for the whole site: a data port belongs to at most one live stream (so a
        (group, port) pair never does either), whatever the DP.  The search starts where the last one
        stopped (a site counter) and skips ports a live session holds; each port is claimed with HSETNX,
        so concurrent allocations never hand out one port twice.  Claims are released when the session
        ends (:meth:`end_session`).  ConfigError when every port of the range is held.
        """
        span = ctl.port_max - ctl.port_min + 1
        if span <= 0:
            raise ConfigError(f"controller port range {ctl.port_min}-{ctl.port_max} is empty")
        out: list[tuple[str, int]] = []
        tried = 0
        while len(out) < streams:
            n = int(self.r.incr(self.k.alloc)) - 1
            tried += 1
            port = ctl.port_min + n % span
            if ":" in ctl.group_prefix:  # IPv6, e.g. ff15::77: -> ff15::77:1 .. ff15::77:ffff
                group = f"{ctl.group_prefix}{1 + n % 0xFFFF:x}"
            else:
                group = f"{ctl.group_prefix}{1 + n % 254}"
            if self.r.hsetnx(self.k.alloc_ports, str(port), f"{group} {session_id}"):
                out.append((group, port))
                continue
            if tried > span + streams:
                self._release_ports(session_id, [p for _, p in out])
                live = int(self.r.hlen(self.k.alloc_ports))
                raise ConfigError(f"no free multicast port: {live} stream(s) of live sessions hold every port of "
                                  f"{ctl.port_min}-{ctl.port_max}; wait for sessions to end or widen the range "
                                  "(MCDEPLOY_CONTROLLER_PORT_MIN/PORT_MAX)")
        return out

    _RELEASE = """
local n = 0
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and string.sub(v, -(#ARGV[1] + 1)) == ' ' .. ARGV[1] then redis.call('HDEL', KEYS[1], ARGV[i]); n = n + 1 end
end
return n
"""

    def _release_ports(self, session_id: int | str, ports: list[int]) -> int:
        """Give back the ports ``session_id`` holds (a port another session holds now is left alone)."""
        if not ports:
            return 0
        return int(self.r.eval(self._RELEASE, 1, self.k.alloc_ports, str(session_id), *[str(p) for p in ports]))

    def allocated(self) -> dict[int, tuple[str, str]]:
        """Every claimed port -> (group, session id) of the live stream holding it."""
        out = {}
        for port, v in self.r.hgetall(self.k.alloc_ports).items():
            group, _, sid = _s(v).partition(" ")
            out[int(_s(port))] = (group, sid)
        return out

    def end_session(self, session_id: int | str) -> int:
        """A session reached a terminal state: it leaves the live set and gives back its ports (idempotent)."""
        raw = self.r.hget(self.k.session(session_id), "ports")
        ports = [int(p) for p in _s(raw).split(",") if p] if raw else []
        self.r.srem(self.k.live_sessions, str(session_id))
        if not ports:  # sessions recorded before ports were: find them by their claims
            ports = [p for p, (_, sid) in self.allocated().items() if sid == str(session_id)]
        return self._release_ports(session_id, ports)

    def live_sessions(self) -> list[str]:
        return sorted(_s(x) for x in self.r.smembers(self.k.live_sessions))

    def new_job(self, dep_id: str, dp: str, image: dict[str, str], req: DeployRequest, ctl: ControllerSettings,
                expected: int, targets: list[Target] | None = None, attempt: int = 1) -> SessionJob:
        """A session job for one DP of a deployment, with its own group and port."""
        streams = 3 if req.slow_policy == "tier" else 1
        session_id = secrets.randbits(63) or 1
        (group, port), *slower = self._allocate(ctl, streams, session_id)
        rate = req.max_rate_mbps or ctl.default_rate_mbps
        tiers = [Tier(group=g, port=p, max_rate_mbps=rate * f) for (g, p), f in zip(slower, (1 / 3, 1 / 10),
                                                                                     strict=False)]
        start_clients = req.start_clients
        if targets is not None and start_clients is not None:
            start_clients = min(start_clients, max(1, len(targets)))
        return SessionJob(
            deployment=dep_id, session_id=session_id, dp=dp,
            image=ImageRef(name=image["name"], path=image["path"], size=int(image["size"]),
                           sha256=image["sha256"], manifest=image.get("manifest", "")),
            group=group, port=port, expected_clients=expected, start_timeout_s=req.start_timeout_s,
            start_clients=start_clients, start_at=req.start_at, max_rate_mbps=req.max_rate_mbps,
            slow_policy=req.slow_policy, drop_below_mbps=req.drop_below_mbps, min_rate_mbps=req.min_rate_mbps,
            slow_grace_s=req.slow_grace_s, unicast_fallback=req.unicast_fallback, tiers=tiers,
            encrypt=req.encrypt, deadline_s=req.deadline_s, targets=targets, attempt=attempt,
        )

    def claim_idempotency(self, req: DeployRequest, dep_id: str) -> str | None:
        """None if ``dep_id`` may be created; else the deployment an earlier trigger with the same key made."""
        if not req.idempotency_key:
            return None
        key = self.k.idempotency(req.idempotency_key)
        if self.r.set(key, dep_id, nx=True):
            return None
        return _s(self.r.get(key))

    @staticmethod
    def new_deployment_id() -> str:
        return f"d-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"

    def create_deployment(self, image: dict[str, str], req: DeployRequest, ctl: ControllerSettings,
                          plan: dict[str, list[Target]] | None = None) -> tuple[str, list[SessionJob], bool]:
        """Create a deployment and its session jobs; returns (id, jobs, created_now).

        ``plan``: a collection deployment's targets per DP (one session each); None: the anonymous
        form, one session on ``req.dp`` for any ``req.clients`` clients.  With an idempotency key,
        a second call returns the first deployment.  Everything is written in one transaction.
        """
        dep_id = self.new_deployment_id()
        existing = self.claim_idempotency(req, dep_id)
        if existing:
            return existing, self.session_jobs(existing), False
        jobs: list[SessionJob] = []
        try:
            if plan is None:
                assert req.dp is not None
                jobs.append(self.new_job(dep_id, req.dp, image, req, ctl, req.clients))
                expected = req.clients
            else:
                for dp, ts in sorted(plan.items()):
                    jobs.append(self.new_job(dep_id, dp, image, req, ctl, len(ts), ts))
                expected = sum(len(ts) for ts in plan.values())
        except Exception:
            self.release_jobs(jobs)
            if req.idempotency_key:
                self.r.delete(self.k.idempotency(req.idempotency_key))
            raise
        now = f"{time.time():.3f}"
        first = jobs[0]
        rec = {"id": dep_id, "kind": "collection" if plan is not None else "any", "image": image["name"],
               "dp": ",".join(j.dp for j in jobs), "collection": req.collection or "", "expected": str(expected),
               "state": "created", "created_at": now, "clients_done": "0", "clients_failed": "0",
               "clients_cancelled": "0", "attempt": "1", "fallback_dp": req.dp or "",
               "deadline_s": f"{req.deadline_s:g}", "encrypt": str(req.encrypt).lower(),
               "session_id": str(first.session_id), "group": first.group, "port": str(first.port),
               "job": msgpack.packb(first.model_dump(mode="json")),
               "request": msgpack.packb(req.model_dump(mode="json"))}
        with self.r.pipeline() as p:
            p.hset(self.k.deployment(dep_id), mapping=rec)
            self._add_sessions(p, dep_id, jobs, now)
            if plan is not None:
                targets = {t.name: json.dumps(self._target_record(t, job, now))
                           for job in jobs for t in job.targets or []}
                p.hset(self.k.targets(dep_id), mapping=targets)
            p.zadd(self.k.deployments, {dep_id: time.time()})
            p.execute()
        return dep_id, jobs, True

    def release_jobs(self, jobs: list[SessionJob]) -> None:
        """Give back the ports of jobs that were never recorded (creation failed)."""
        for job in jobs:
            self._release_ports(job.session_id, [job.port, *(t.port for t in job.tiers)])

    @staticmethod
    def _target_record(t: Target, job: SessionJob, now: str) -> dict[str, Any]:
        return {"name": t.name, "mac": t.mac or "", "smbios_uuid": t.smbios_uuid or "", "dp": job.dp,
                "session": str(job.session_id), "attempt": job.attempt, "state": "created", "created_at": now,
                "reason": ""}

    def _add_sessions(self, p: Any, dep_id: str, jobs: list[SessionJob], now: str) -> None:
        for job in jobs:
            p.hset(self.k.session(job.session_id), mapping={
                "id": str(job.session_id), "deployment": dep_id, "dp": job.dp, "attempt": str(job.attempt),
                "state": "created", "created_at": now, "group": job.group, "port": str(job.port),
                "clients": str(len(job.targets) if job.targets is not None else job.expected_clients),
                "ports": ",".join(str(x) for x in [job.port, *(t.port for t in job.tiers)]),
                "dispatched_at": now, "job": msgpack.packb(job.model_dump(mode="json"))})
            p.rpush(self.k.sessions(dep_id), str(job.session_id))
            p.sadd(self.k.live_sessions, str(job.session_id))

    def deployment_request(self, dep_id: str) -> DeployRequest:
        raw = self.r.hget(self.k.deployment(dep_id), "request")
        if raw is None:
            raise NotFoundError(f"unknown deployment {dep_id!r}")
        return DeployRequest.model_validate(msgpack.unpackb(raw))

    def session_job(self, dep_id: str) -> SessionJob:
        raw = self.r.hget(self.k.deployment(dep_id), "job")
        if raw is None:
            raise NotFoundError(f"unknown deployment {dep_id!r}")
        return SessionJob.model_validate(msgpack.unpackb(raw))

    def session_jobs(self, dep_id: str) -> list[SessionJob]:
        """Every session job of a deployment (deployments made before sessions were recorded: the one job)."""
        sids = [_s(x) for x in self.r.lrange(self.k.sessions(dep_id), 0, -1)]
        jobs = []
        for sid in sids:
            raw = self.r.hget(self.k.session(sid), "job")
            if raw is not None:
                jobs.append(SessionJob.model_validate(msgpack.unpackb(raw)))
        return jobs or [self.session_job(dep_id)]

    def list_sessions(self, dep_id: str) -> list[dict[str, str]]:
        out = []
        for sid in [_s(x) for x in self.r.lrange(self.k.sessions(dep_id), 0, -1)]:
            raw = self.r.hgetall(self.k.session(sid))
            if raw:
                out.append({_s(k): _s(v) for k, v in raw.items() if _s(k) not in ("job", "request")})
        return out

    def session_state(self, session_id: int) -> str | None:
        raw = self.r.hget(self.k.session(session_id), "state")
        return _s(raw) if raw is not None else None

    def _move_targets(self, dep_id: str, state: str, *, reason: str = "", session: str = "", packed: bytes = b"",
                      flags: str = "", joined: float | None = None, names: list[str] | tuple[str, ...] = ()) -> int:
        return int(self._targets_move(
            keys=[self.k.targets(dep_id), self.k.deployment(dep_id), self.k.clients(dep_id)],
            args=[state, f"{time.time():.3f}", reason[:500], session, packed, flags,
                  "" if joined is None else f"{joined:.3f}", *names]))

    def record_session_report(self, rep: SessionReport) -> bool:
        """Advance the session's and the deployment's states from a DP report; repeats change nothing.

        Collection deployments: the session's clients move with it (staging, waiting; transferring
        once they joined); a terminal session report moves no client (see :meth:`close_session`).
        """
        key = self.k.deployment(rep.deployment)
        now = f"{time.time():.3f}"
        figures = ["bytes_sent", str(rep.bytes_sent), "clients_joined", str(rep.clients_joined),
                   "session_state", rep.state]
        skey = self.k.session(rep.session_id)
        if self.r.exists(skey):
            self._advance(keys=[skey], args=[rep.state, _ORDER[rep.state], now, *figures,
                                             *(["reason", rep.reason] if rep.reason else [])])
            if rep.state in TERMINAL:
                self.end_session(rep.session_id)
        if _s(self.r.hget(key, "kind") or b"") == "collection":
            sid = str(rep.session_id)
            if rep.state in TERMINAL:
                return False
            moved = bool(self._advance(keys=[key], args=[rep.state, _ORDER[rep.state], now]))
            # Reports may be handled out of order: clients follow the session's furthest state.
            current = _s(self.r.hget(skey, "state") or rep.state.encode())
            state = current if _ORDER.get(current, 0) > _ORDER[rep.state] and current not in TERMINAL else rep.state
            if rep.joined:
                self._move_targets(rep.deployment, state, session=sid, flags="J", names=rep.joined)
            self._move_targets(rep.deployment, state, session=sid, flags="j" if state == "transferring" else "")
            return moved
        fields = list(figures)
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
        return bool(self._advance(keys=[key], args=[state, _ORDER[state], now, *fields]))

    def close_session(self, rep: SessionReport) -> int:
        """A collection session ended: its clients without a result failed (with the session's reason)."""
        why = rep.reason if rep.state == "failed" and rep.reason else \
            f"no result from this client when its session ended{': ' + rep.reason if rep.reason else ''}"
        return self._move_targets(rep.deployment, "failed", reason=why, session=str(rep.session_id))

    def record_client_result(self, res: ClientResult) -> bool:
        """Record a client's terminal result once; returns whether it was new."""
        dkey = self.k.deployment(res.deployment)
        kind = self.r.hget(dkey, "kind")
        if kind is None and not self.r.exists(dkey):
            raise NotFoundError(f"result for unknown deployment {res.deployment!r}")
        now = time.time()
        packed = msgpack.packb({**res.model_dump(mode="json"), "recorded_at": now})
        if kind is not None and _s(kind) == "collection":
            moved = self._move_targets(res.deployment, "finished" if res.outcome == "done" else "failed",
                                       reason=res.reason, session=str(res.session_id), packed=packed,
                                       joined=now - res.seconds if res.seconds else None, names=[res.client_id])
            if moved and res.address and self.r.exists(self.k.client(res.client_id)):
                self.r.hset(self.k.client(res.client_id), mapping={"address": res.address, "seen_at": f"{now:.3f}"})
            return bool(moved)
        return bool(self._record(keys=[self.k.clients(res.deployment), dkey],
                                 args=[res.client_id, packed, res.outcome, f"{now:.3f}"]))

    def cancel_deployment(self, dep_id: str, reason: str) -> list[tuple[int, str]] | None:
        """Mark a deployment, its open sessions and unfinished clients cancelled.

        Returns the (session id, DP) pairs to tell, or None if it was already cancelled.  A
        finished or failed deployment is refused (ConfigError).
        """
        key = self.k.deployment(dep_id)
        state = self.r.hget(key, "state")
        if state is None:
            raise NotFoundError(f"unknown deployment {dep_id!r}")
        if _s(state) == "cancelled":
            return None
        if _s(state) in TERMINAL:
            raise ConfigError(f"deployment {dep_id} already {_s(state)}: nothing to cancel "
                              "(`mcdeploy deploy retry` runs its failed clients again)")
        now = f"{time.time():.3f}"
        self.r.hset(key, mapping={"state": "cancelled", "cancelled_at": now, "finished_at": now, "reason": reason})
        self._move_targets(dep_id, "cancelled", reason=reason)
        out = []
        for sess in self.list_sessions(dep_id):
            if sess.get("state") not in TERMINAL:
                self.r.hset(self.k.session(sess["id"]), mapping={"state": "cancelled", "cancelled_at": now,
                                                                  "reason": reason})
                self.end_session(sess["id"])
                out.append((int(sess["id"]), sess["dp"]))
        return out

    def targets(self, dep_id: str) -> dict[str, dict[str, Any]]:
        return {_s(k): json.loads(v) for k, v in self.r.hgetall(self.k.targets(dep_id)).items()}

    def retry_targets(self, dep_id: str, names: list[str], jobs: list[SessionJob]) -> None:
        """Give ``names`` (failed or cancelled targets) a new attempt in ``jobs``; one transaction.

        Each client's previous attempt goes to its ``history``; the deployment is open again.
        """
        tkey, dkey = self.k.targets(dep_id), self.k.deployment(dep_id)
        job_of = {t.name: job for job in jobs for t in job.targets or []}
        now = f"{time.time():.3f}"
        with self.r.pipeline() as p:
            p.watch(tkey, dkey)
            recs = {n: json.loads(p.hget(tkey, n)) for n in names}
            if any(r["state"] not in ("failed", "cancelled") for r in recs.values()):
                raise ConfigError(f"deployment {dep_id} changed while retrying; run retry again")
            failed = sum(1 for r in recs.values() if r["state"] == "failed")
            cancelled = len(recs) - failed
            attempt = max(j.attempt for j in jobs)
            p.multi()
            for n, r in recs.items():
                job = job_of[n]
                past = {k: v for k, v in r.items() if k not in ("history", "name", "mac", "smbios_uuid")}
                new = {**self._target_record(Target(name=n, mac=r.get("mac") or None,
                                                    smbios_uuid=r.get("smbios_uuid") or None), job, now),
                       "history": [*r.get("history", []), past]}
                p.hset(tkey, n, json.dumps(new))
            p.hdel(self.k.clients(dep_id), *names)
            p.hincrby(dkey, "clients_failed", -failed)
            p.hincrby(dkey, "clients_cancelled", -cancelled)
            p.hdel(dkey, *[f"{s}_at" for s in ("staging", "waiting", "transferring", "finished", "failed",
                                                "cancelled")])
            p.hset(dkey, mapping={"state": "created", "attempt": str(attempt), "retried_at": now, "reason": ""})
            self._add_sessions(p, dep_id, jobs, now)
            p.execute()

    def set_progress(self, dep_id: str, progress: dict[str, int]) -> None:
        """Volatile per-client progress (blocks received), written by the DP.

        A client whose count moved is stamped in ``seen`` (the reconciler times out clients whose
        progress stopped moving).
        """
        if not progress:
            return
        key, seen = self.k.progress(dep_id), self.k.seen(dep_id)
        names = list(progress)
        old = self.r.hmget(key, names)
        now = f"{time.time():.3f}"
        moved = {n: now for n, o in zip(names, old, strict=True) if o is None or int(o) != int(progress[n])}
        with self.r.pipeline() as p:
            p.hset(key, mapping={k: str(v) for k, v in progress.items()})
            p.expire(key, 24 * 3600)
            if moved:
                p.hset(seen, mapping=moved)
                p.expire(seen, 24 * 3600)
            p.execute()

    def last_seen(self, dep_id: str) -> dict[str, float]:
        return {_s(k): float(v) for k, v in self.r.hgetall(self.k.seen(dep_id)).items()}

    SESSION_FIGURES = ("clients_joined", "clients_done", "clients_failed", "bytes_sent", "rate_mbps", "percent",
                       "eta_s", "blocks_total", "session_state")

    def set_session_progress(self, session_id: int, figures: dict[str, Any]) -> None:
        """Live figures of a running session (the DP writes them each second; ``status --watch`` reads them)."""
        key = self.k.session(session_id)
        put = {f"live_{k}": str(v) for k, v in figures.items() if k in self.SESSION_FIGURES and v is not None}
        if put and self.r.exists(key):
            self.r.hset(key, mapping={**put, "live_at": f"{time.time():.3f}"})

    def session(self, session_id: int | str) -> dict[str, str]:
        raw = self.r.hgetall(self.k.session(session_id))
        return {_s(k): _s(v) for k, v in raw.items() if _s(k) != "job"}

    def session_job_by_id(self, session_id: int | str) -> SessionJob | None:
        raw = self.r.hget(self.k.session(session_id), "job")
        return SessionJob.model_validate(msgpack.unpackb(raw)) if raw is not None else None

    def claim_redispatch(self, session_id: int | str, window_s: float) -> bool:
        """True for one caller per ``window_s`` (two reconcilers never both re-dispatch a session)."""
        return bool(self.r.set(self.k.redispatch(session_id), f"{time.time():.3f}", nx=True,
                               px=max(1, int(window_s * 1000))))

    def lease_holder(self, session_id: int | str) -> str | None:
        raw = self.r.get(self.k.lease(int(session_id)))
        return _s(raw) if raw is not None else None

    def fail_targets(self, dep_id: str, names: list[str], reason: str, session: str = "") -> int:
        """Fail these targets (not yet terminal) with ``reason``; finishes the deployment when all are in."""
        if not names:
            return 0
        return self._move_targets(dep_id, "failed", reason=reason, session=session, names=names)

    def expire_deployment(self, dep_id: str, reason: str) -> list[tuple[int, str]]:
        """The deadline passed: unfinished clients fail with ``reason``, so does the deployment; open
        sessions are marked failed and returned as (session id, DP) for the DPs to abort.  Idempotent."""
        key = self.k.deployment(dep_id)
        now = f"{time.time():.3f}"
        if _s(self.r.hget(key, "state") or b"finished") not in TERMINAL:
            if _s(self.r.hget(key, "kind") or b"") == "collection":
                self._move_targets(dep_id, "failed", reason=reason)
            self.r.hset(key, mapping={"state": "failed", "failed_at": now, "finished_at": now, "reason": reason})
        out = []
        for sess in self.list_sessions(dep_id):
            if sess.get("state") not in TERMINAL:
                self._advance(keys=[self.k.session(sess["id"])], args=["failed", _ORDER["failed"], now,
                                                                        "reason", reason])
                self.end_session(sess["id"])
                out.append((int(sess["id"]), sess["dp"]))
        return out

    def close_deployment(self, dep_id: str, final: str, reason: str) -> bool:
        """Move an open deployment to ``final`` (every client accounted for); False if it had ended."""
        key = self.k.deployment(dep_id)
        if _s(self.r.hget(key, "state") or b"finished") in TERMINAL:
            return False
        now = f"{time.time():.3f}"
        return bool(self._advance(keys=[key], args=[final, _ORDER[final], now, "finished_at", now, "reason", reason]))

    def end_lease(self, session_id: int, holder: str, fence: int, ttl: float) -> None:
        """The session ended on this sender: its lease stays a while marked ended, so the reconciler never
        takes the gap before the final report lands for a lapsed lease."""
        key = self.k.lease(session_id)
        if _s(self.r.get(key) or b"") == f"{holder}:{fence}":
            self.r.set(key, f"ended:{holder}:{fence}", px=int(ttl * 1000))

    def mark_redispatched(self, session_id: int | str, reason: str) -> int:
        key = self.k.session(session_id)
        with self.r.pipeline() as p:
            p.hincrby(key, "redispatches", 1)
            p.hset(key, mapping={"dispatched_at": f"{time.time():.3f}", "redispatch_reason": reason[:500]})
            return int(p.execute()[0])

    def get_deployment(self, dep_id: str) -> dict[str, Any]:
        raw = self.r.hgetall(self.k.deployment(dep_id))
        if not raw:
            raise NotFoundError(f"unknown deployment {dep_id!r}")
        rec: dict[str, Any] = {_s(k): _s(v) for k, v in raw.items() if _s(k) not in ("job", "request")}
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
                out.append({_s(k): _s(v) for k, v in raw.items() if _s(k) not in ("job", "request")})
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
