"""The one codec: every model round-trips; every kind of bad input is one MessageError."""

from __future__ import annotations

import json
import subprocess

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcproto import codec
from mcproto.errors import MessageError
from mcproto.messages import (
    ALL_MESSAGES,
    CONTROL_PLANE,
    Ack,
    ClientResult,
    Done,
    Failed,
    ImageRef,
    Join,
    NoSession,
    Offer,
    SessionJob,
    SessionReport,
    Status,
)
from mcsite.procs import python_module

SHA = "ab" * 32
SAMPLES = [
    Join(client_id="pc-01", deployment="d-1", mac="00:11:22:33:44:55"),
    Offer(session_id=2**63 + 5, deployment="d-1", group="239.255.77.1", port=47200, image_size=10**12,
          image_sha256=SHA, symbol_size=1400, block_symbols=128),
    NoSession(reason="no session here", retry_after_ms=2000),
    Status(session_id=1, client_id="pc", blocks_done=10, needs=[[0, 5, 128], [100, 1, 3]], loss_permille=12),
    Done(session_id=1, client_id="pc", sha256=SHA, bytes=5, seconds=1.5),
    Failed(session_id=1, client_id="pc", reason="disk full"),
    Ack(session_id=1, client_id="pc", outcome="done"),
]
BODIES = [
    SessionJob(deployment="d-1", session_id=9, dp="dp1", group="239.255.77.1", port=47200,
               image=ImageRef(name="win11", path="/srv/win11.wim", size=1, sha256=SHA)),
    ClientResult(deployment="d-1", session_id=9, dp="dp1", client_id="pc", outcome="failed", reason="x"),
    SessionReport(deployment="d-1", session_id=9, dp="dp1", state="finished", bytes_sent=10),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.type)
def test_session_plane_messages_round_trip(msg) -> None:  # type: ignore[no-untyped-def]
    assert codec.decode(codec.encode(msg)) == msg


@pytest.mark.parametrize("msg", BODIES, ids=lambda m: m.type)
def test_task_bodies_round_trip_as_plain_data(msg) -> None:  # type: ignore[no-untyped-def]
    body = codec.to_body(msg)
    json.dumps(body)  # Flower renders bodies as JSON
    assert codec.from_body(type(msg), msgpack.unpackb(msgpack.packb(body))) == msg


@pytest.mark.parametrize("data, needle", [
    (b"", "empty"),
    (b"\xc1", "malformed"),
    (msgpack.packb([1, 2]), "expected a map"),
    (msgpack.packb({"type": "join", "version": 2, "client_id": "x"}), "unsupported protocol version"),
    (msgpack.packb({"type": "zap"}), "unknown message type"),
    (msgpack.packb({"type": "join", "client_id": "x", "extra": 1}), "Extra inputs"),
    (msgpack.packb({"type": "join", "client_id": "bad id with spaces"}), "invalid join"),
    (msgpack.packb({"type": "status", "session_id": 0, "client_id": "x", "blocks_done": 0}), "invalid status"),
    (msgpack.packb({"type": "status", "session_id": 1, "client_id": "x", "blocks_done": 0,
                    "needs": [[1, 2, 3]] * 65}), "invalid status"),
    (msgpack.packb({"type": "status", "session_id": 1, "client_id": "x", "blocks_done": 0,
                    "needs": [[1, 2]]}), "invalid status"),
    (b"\x81" + b"\xa1a" * 800, "exceeds limit"),
    (msgpack.packb({"type": "session_job"}), "not accepted here"),
])
def test_bad_datagrams_raise_one_clear_error(data: bytes, needle: str) -> None:
    with pytest.raises(MessageError, match=needle):
        codec.decode(data)


def test_encode_refuses_oversized_messages() -> None:
    with pytest.raises(MessageError, match="limit"):
        codec.encode(NoSession(reason="x" * 500), max_size=100)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes_only_ever_raise_message_error(data: bytes) -> None:
    try:
        codec.decode(data)
    except MessageError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from([m.model_fields["type"].default for m in ALL_MESSAGES]),
       st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_fuzz_structured_maps_only_ever_raise_message_error(tag: str, fields: dict) -> None:
    try:
        codec.decode(msgpack.packb({**fields, "type": tag}), allowed=None)
    except MessageError:
        pass


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_fuzz_task_bodies_only_ever_raise_message_error(body) -> None:  # type: ignore[no-untyped-def]
    for model in CONTROL_PLANE:
        try:
            codec.from_body(model, body)
        except MessageError:
            pass


def test_schema_command_exports_every_model() -> None:
    proc = subprocess.run(python_module("controller", "schema"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    schemas = json.loads(proc.stdout)
    assert set(schemas) == {m.model_fields["type"].default for m in ALL_MESSAGES}
    deploy = schemas["deploy_request"]
    assert deploy["additionalProperties"] is False
    assert "image" in deploy["required"]  # dp or collection: checked by the model
