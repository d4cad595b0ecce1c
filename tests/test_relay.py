"""The DP's result relay: a result acknowledged to a client survives Redis being away and the agent dying.

Real parts: a Celery app pointed at a port where no Redis listens (publishing fails), then a new
relay (as a restarted agent would build) over the same spool directory, pointed at the tests' real
Redis: it publishes what the dead one spooled, and the message is really in the controller queue.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import redis as redis_lib
from celery import Celery

from dpagent.relay import Relay
from mcproto.messages import ClientResult
from mcsite.celeryapp import configure
from mcsite.embedded_redis import EmbeddedRedis
from mcsite.state import State
from tests.conftest import free_udp_port


def _result(client: str) -> ClientResult:
    return ClientResult(deployment="d-relay", session_id=5, dp="dp1", client_id=client, outcome="done",
                        sha256="ab" * 32, bytes=10, seconds=1.0, address="127.0.0.1")


def _queue_bodies(url: str) -> list[str]:
    r = redis_lib.Redis.from_url(url)
    clients = []
    for raw in reversed(r.lrange("controller", 0, -1)):  # kombu LPUSHes and consumers pop the right end
        env = __import__("json").loads(raw)
        body = msgpack.unpackb(__import__("base64").b64decode(env["body"]), raw=False)
        clients.append(body[1]["body"]["client_id"])
    return clients


def test_results_spooled_while_redis_is_away_are_published_by_the_next_agent(
        tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    spool = tmp_path / "spool"
    dead_url = f"redis://127.0.0.1:{free_udp_port()}/0"
    dead = configure(Celery("dead-relay"), dead_url)
    dead.conf.broker_connection_timeout = 0.5
    first = Relay(dead, State.from_url(dead_url), str(spool))
    assert first.send(_result("pc-a")) is False and first.send(_result("pc-b")) is False
    assert first.spooled == 2 and len(list(spool.glob("*.msg"))) == 2  # durable before anyone was told "ack"
    del first  # the agent is killed: nothing in memory survives

    live = configure(Celery("live-relay"), redis_server.url)
    r = redis_lib.Redis.from_url(redis_server.url)
    r.delete("controller")
    second = Relay(live, State.from_url(redis_server.url), str(spool))
    assert second.recovered == 2
    assert second.flush() is True
    assert second.spooled == 0 and not list(spool.glob("*.msg"))
    assert _queue_bodies(redis_server.url) == ["pc-a", "pc-b"]  # oldest first, each once
    r.delete("controller")


def test_a_torn_spool_file_is_set_aside_not_fatal(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "000000000001-deadbeef.msg").write_bytes(b"\x82\xa4ty")  # cut mid-write by a crash
    live = configure(Celery("live-relay2"), redis_server.url)
    relay = Relay(live, State.from_url(redis_server.url), str(spool))
    assert relay.recovered == 0
    assert (spool / "000000000001-deadbeef.msg.bad").exists()
    assert relay.send(_result("pc-c")) is True
    assert not list(spool.glob("*.msg"))
    redis_lib.Redis.from_url(redis_server.url).delete("controller")


def test_without_a_spool_directory_the_relay_still_works_in_memory(redis_server: EmbeddedRedis) -> None:
    live = configure(Celery("live-relay3"), redis_server.url)
    relay = Relay(live, State.from_url(redis_server.url), None)
    assert relay.send(_result("pc-d")) is True and relay.spooled == 0
    redis_lib.Redis.from_url(redis_server.url).delete("controller")
    assert os.path.isdir("/") and relay.stats() == {"spooled": 0, "recovered": 0}
