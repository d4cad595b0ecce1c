"""Every coordination message of mcdeploy as a strict pydantic v2 model.

Pure: no I/O.  Wire discipline (as msgspec teaches): every message has a ``type``
tag and a protocol ``version``; new fields get defaults; nothing is reordered or
reused; unknown fields are rejected.  Two families live here:

* session plane (client <-> DP agent, unicast msgpack datagrams):
  ``Join``, ``Offer``, ``NoSession``, ``ManifestGet``/``ManifestPart``, ``Status``, ``Done``,
  ``Failed``, ``Ack``;
* control plane (Celery task bodies between controller and DP agents):
  ``DeployRequest``, ``SessionJob``, ``CancelSession``, ``ClientResult``, ``SessionReport``.

Task bodies stay plain JSON-compatible values (Flower renders them as JSON).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from mcproto import PROTOCOL_VERSION

Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Reason = Annotated[str, StringConstraints(max_length=500)]
Hex32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
SessionId = Annotated[int, Field(ge=1, lt=2**64)]
Port = Annotated[int, Field(ge=1, le=65535)]
# Blocks still short of symbols, as [first_block, block_count, symbols_needed_each]; lists,
# not tuples, because msgpack round-trips tuples as lists.
NeedRange = Annotated[list[Annotated[int, Field(ge=0, lt=2**32)]], Field(min_length=3, max_length=3)]

# Which path delivered a client's image: the multicast session, the DP's HTTP (unicast fallback), or both.
DeliveryPath = Literal["multicast", "unicast", "mixed"]

MAX_RANGES_PER_STATUS = 64
# The signed manifest travels to clients in parts that fit one session-plane datagram; it is at
# most 65,536 chunk digests plus a little (see mcproto.manifest), so ~1,100 parts.
MANIFEST_PART_BYTES = 1024
MAX_MANIFEST_BYTES = 2 * 1024 * 1024


class Message(BaseModel):
    """Base of all coordination messages: strict, frozen, no unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: int = PROTOCOL_VERSION


# --------------------------------------------------------------------------- session plane


class Announce(Message):
    """DP -> group (inside an ANNOUNCE packet): a session is here; join it at ``control``.

    ``control_host`` empty means "the source address of this packet".
    """

    type: Literal["announce"] = "announce"
    session_id: SessionId
    deployment: Name
    control_host: Annotated[str, StringConstraints(max_length=64)] = ""
    control_port: Port
    image_size: Annotated[int, Field(ge=0)]


class Join(Message):
    """Client -> DP: who I am and, optionally, which deployment I expect."""

    type: Literal["join"] = "join"
    client_id: Name
    deployment: Name | None = None
    mac: Annotated[str, StringConstraints(max_length=64)] | None = None
    smbios_uuid: Annotated[str, StringConstraints(max_length=64)] | None = None
    agent: Annotated[str, StringConstraints(max_length=64)] = ""
    client_key: Hex32 | None = None  # ephemeral X25519 public key: the session key is wrapped to it


class Offer(Message):
    """DP -> client: the session to join and everything needed to receive it."""

    type: Literal["offer"] = "offer"
    session_id: SessionId
    deployment: Name
    group: Annotated[str, StringConstraints(max_length=64)]
    port: Port
    image_size: Annotated[int, Field(ge=0)]
    image_sha256: Sha256Hex
    symbol_size: Annotated[int, Field(ge=16, le=65000)]
    block_symbols: Annotated[int, Field(ge=1, le=32768)]
    # The erasure code (mcproto.fec): "rs" zfec GF(2^8), k <= 255, 256 ids per block; "rs16" GF(2^16),
    # k <= 32,768, k_b + repair_symbols ids per block (its repair values depend on R: sender and receivers agree).
    fec: Literal["rs", "rs16"] = "rs"
    repair_symbols: Annotated[int, Field(ge=0, le=32768)] = 0
    feedback_interval_ms: Annotated[int, Field(ge=5, le=10_000)] = 50
    # Sealed sessions: the session key wrapped to the client's key, and the DP's signature over the offer.
    encrypted: bool = False
    eph_key: Hex32 | None = None
    key_box: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{96}$")] | None = None
    dp_key: Hex32 | None = None
    signature: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")] | None = None
    # Length of the controller-signed image manifest the DP serves (ManifestGet); 0: none.
    manifest_bytes: Annotated[int, Field(ge=0, le=MAX_MANIFEST_BYTES)] = 0
    # Unicast fallback (deployments that allow it): where the DP serves the image over HTTP with range
    # requests, and this client's token for it (sent back in a header; covered by the DP's signature).
    http_url: Annotated[str, StringConstraints(max_length=200)] = ""
    http_token: Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{32})?$")] = ""

    @model_validator(mode="after")
    def _fec_geometry(self) -> Offer:
        if self.fec == "rs" and (self.block_symbols > 255 or self.repair_symbols):
            raise ValueError("fec rs: block_symbols must be <= 255 and repair_symbols 0")
        if self.fec == "rs16" and (self.repair_symbols < 1 or self.symbol_size % 2):
            raise ValueError("fec rs16: repair_symbols must be >= 1 and symbol_size even")
        return self


class ManifestGet(Message):
    """Client -> DP: send ``length`` bytes of the session's signed manifest from ``offset``."""

    type: Literal["manifest_get"] = "manifest_get"
    session_id: SessionId
    client_id: Name
    offset: Annotated[int, Field(ge=0, le=MAX_MANIFEST_BYTES)]


class ManifestPart(Message):
    """DP -> client: a piece of the signed manifest (the client checks the whole by its signature)."""

    type: Literal["manifest_part"] = "manifest_part"
    session_id: SessionId
    offset: Annotated[int, Field(ge=0, le=MAX_MANIFEST_BYTES)]
    total: Annotated[int, Field(ge=1, le=MAX_MANIFEST_BYTES)]
    data: Annotated[bytes, Field(min_length=1, max_length=MANIFEST_PART_BYTES)]


class NoSession(Message):
    """DP -> client: nothing to join now.

    ``retry_after_ms`` > 0 means "wait and ask again" ("wait"); 0 means "nothing for you" (stop).
    ``expected_start``: when the session this client waits for is expected to start (Unix seconds),
    if a start policy says so (its start time, or its opening plus its start timeout).
    """

    type: Literal["no_session"] = "no_session"
    reason: Reason
    retry_after_ms: Annotated[int, Field(ge=0, le=3_600_000)] = 0
    expected_start: Annotated[float, Field(gt=0)] | None = None


class Status(Message):
    """Client -> DP: progress and how many more symbols each unfinished block needs.

    ``needs`` covers only blocks the sender has passed; ``loss_permille`` is the
    client's recent first-pass loss (the sender sizes proactive repair by it).
    """

    type: Literal["status"] = "status"
    session_id: SessionId
    client_id: Name
    blocks_done: Annotated[int, Field(ge=0)]
    needs: Annotated[list[NeedRange], Field(max_length=MAX_RANGES_PER_STATUS)] = []
    loss_permille: Annotated[int, Field(ge=0, le=1000)] = 0
    recv_kbps: Annotated[int, Field(ge=0, lt=2**40)] | None = None  # data arrival rate since the last status


class Done(Message):
    """Client -> DP: the image is complete and verified; carries the digest computed."""

    type: Literal["done"] = "done"
    session_id: SessionId
    client_id: Name
    sha256: Sha256Hex
    bytes: Annotated[int, Field(ge=0)]
    seconds: Annotated[float, Field(ge=0)]
    path: DeliveryPath = "multicast"


class Failed(Message):
    """Client -> DP: the client gives up, and why.

    ``refused``: it refused the offer (an identity, key or manifest it does not trust) and took
    no part: recorded as failed with the reason, but not counted among the clients the session
    waits for (an impostor's offer must not stand in for an expected machine).
    """

    type: Literal["failed"] = "failed"
    session_id: SessionId
    client_id: Name
    reason: Reason
    refused: bool = False


class Drop(Message):
    """DP -> client: you are removed from the multicast session (too slow), and why.

    ``unicast_allowed``: the deployment lets this client fetch what it lacks by unicast.
    """

    type: Literal["drop"] = "drop"
    session_id: SessionId
    client_id: Name
    reason: Reason
    unicast_allowed: bool = False


class Ack(Message):
    """DP -> client: your result was recorded (and relayed); ``outcome`` is what we recorded."""

    type: Literal["ack"] = "ack"
    session_id: SessionId
    client_id: Name
    outcome: Literal["done", "failed"]
    reason: Reason = ""


# --------------------------------------------------------------------------- control plane


class DeployRequest(Message):
    """Anyone -> controller (task ``controller.deploy``): deploy an image from a DP.

    ``idempotency_key``: the same request twice makes one deployment.  Start policy (first
    condition met wins): ``start_clients`` joined (default: ``clients``), ``start_timeout_s``
    elapsed, or the wall-clock time ``start_at`` (Unix seconds) reached.  Slow clients:
    ``slow_policy`` "hold" (the session slows to the slowest, down to ``min_rate_mbps``), "drop"
    (a client receiving below ``drop_below_mbps`` is dropped, and told if ``unicast_fallback``) or
    "tier" (such a client moves to a slower stream: 1/3, then 1/10 of the rate, WDS multistream).

    Two forms: ``dp`` + ``clients`` (any N clients that join that DP), or ``collection`` (exactly
    the clients of that collection, one session per DP their boundary groups map them to; ``dp``
    then serves the clients whose address is unknown or in no boundary group).  ``deadline_s``:
    a session gives up on clients still receiving that long after it opened.
    """

    type: Literal["deploy_request"] = "deploy_request"
    image: Name
    dp: Name | None = None
    collection: Name | None = None
    clients: Annotated[int, Field(ge=0, le=100_000)] = 0
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    start_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    start_clients: Annotated[int, Field(ge=1, le=100_000)] | None = None
    start_at: Annotated[float, Field(gt=0)] | None = None
    max_rate_mbps: Annotated[float, Field(gt=0, le=100_000)] | None = None
    slow_policy: Literal["hold", "drop", "tier"] = "hold"
    drop_below_mbps: Annotated[float, Field(gt=0, le=100_000)] | None = None
    min_rate_mbps: Annotated[float, Field(gt=0, le=100_000)] | None = None
    slow_grace_s: Annotated[float, Field(gt=0, le=3600)] = 2.0
    unicast_fallback: bool = False
    # False: send this deployment's packets in the clear (e.g. a lab without a DP identity pinned).
    encrypt: bool = True
    deadline_s: Annotated[float, Field(gt=0, le=7 * 86_400)] = 4 * 3600.0

    @model_validator(mode="after")
    def _target(self) -> DeployRequest:
        if self.dp is None and self.collection is None:
            raise ValueError("a deployment needs a collection, or a DP and a client count (dp)")
        if self.collection is not None and self.clients:
            raise ValueError("clients (a count) is for deployments without a collection")
        return self


class Target(Message):
    """A client a collection deployment targets: its name and the identities it may join by."""

    type: Literal["target"] = "target"
    name: Name
    mac: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")] | None = None
    smbios_uuid: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$")] | None = None


class Tier(Message):
    """One slower stream of a tiered session: its group, port and maximum rate."""

    type: Literal["tier"] = "tier"
    group: Annotated[str, StringConstraints(max_length=64)]
    port: Port
    max_rate_mbps: Annotated[float, Field(gt=0, le=100_000)]


class ImageRef(Message):
    """Where an image's content lives and what it must hash to."""

    type: Literal["image_ref"] = "image_ref"
    name: Name
    path: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    size: Annotated[int, Field(ge=0)]
    sha256: Sha256Hex
    # The controller-signed manifest (mcproto.manifest wire form), base64: task bodies stay JSON-compatible.
    manifest: Annotated[str, StringConstraints(max_length=MAX_MANIFEST_BYTES * 4 // 3 + 4)] = ""


class SessionJob(Message):
    """Controller -> DP agent (task ``dp.open_session``): run one multicast session."""

    type: Literal["session_job"] = "session_job"
    deployment: Name
    session_id: SessionId
    dp: Name
    image: ImageRef
    group: Annotated[str, StringConstraints(max_length=64)]
    port: Port
    expected_clients: Annotated[int, Field(ge=0, le=100_000)] = 0
    # Start policy, first condition met wins: start_clients joined (default: expected_clients),
    # start_timeout_s after the session opened, or the wall-clock time start_at (Unix seconds).
    start_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    start_clients: Annotated[int, Field(ge=1, le=100_000)] | None = None
    start_at: Annotated[float, Field(gt=0)] | None = None
    max_rate_mbps: Annotated[float, Field(gt=0, le=100_000)] | None = None
    # Slow clients: "hold" slows the session to the slowest (down to min_rate_mbps); "drop"
    # removes a client receiving below drop_below_mbps for slow_grace_s, telling it whether it may
    # use unicast; "tier" moves it to the next of ``tiers`` instead.
    slow_policy: Literal["hold", "drop", "tier"] = "hold"
    drop_below_mbps: Annotated[float, Field(gt=0, le=100_000)] | None = None
    min_rate_mbps: Annotated[float, Field(gt=0, le=100_000)] | None = None
    slow_grace_s: Annotated[float, Field(gt=0, le=3600)] = 2.0
    unicast_fallback: bool = False
    tiers: Annotated[list[Tier], Field(max_length=2)] = []  # slower streams for slow_policy "tier"
    deadline_s: Annotated[float, Field(gt=0, le=7 * 86_400)] = 4 * 3600.0
    # False: this deployment's packets go in the clear (the DP logs it loudly, results say so).
    encrypt: bool = True
    # Collection deployments: only these clients get an offer (None: any client, the anonymous form).
    targets: Annotated[list[Target], Field(max_length=100_000)] | None = None
    attempt: Annotated[int, Field(ge=1, le=1000)] = 1


class CancelSession(Message):
    """Controller -> DP agent (task ``dp.cancel_session``): abort a session (its clients are failed)."""

    type: Literal["cancel_session"] = "cancel_session"
    deployment: Name
    session_id: SessionId
    dp: Name
    reason: Reason = "cancelled by the operator"


class ClientResult(Message):
    """DP agent -> controller (task ``controller.client_result``): one client's outcome."""

    type: Literal["client_result"] = "client_result"
    deployment: Name
    session_id: SessionId
    dp: Name
    client_id: Name
    outcome: Literal["done", "failed"]
    sha256: Sha256Hex | None = None
    reason: Reason = ""
    bytes: Annotated[int, Field(ge=0)] = 0
    seconds: Annotated[float, Field(ge=0)] = 0.0
    address: Annotated[str, StringConstraints(max_length=128)] = ""
    path: DeliveryPath = "multicast"  # which path delivered the image (done results)


class SessionReport(Message):
    """DP agent -> controller (task ``controller.session_report``): session lifecycle."""

    type: Literal["session_report"] = "session_report"
    deployment: Name
    session_id: SessionId
    dp: Name
    state: Literal["staging", "waiting", "transferring", "finished", "failed"]
    reason: Reason = ""
    # Targeted clients (by name) that joined since the last report (collection deployments).
    joined: Annotated[list[Name], Field(max_length=10_000)] = []
    clients_joined: Annotated[int, Field(ge=0)] = 0
    clients_done: Annotated[int, Field(ge=0)] = 0
    clients_failed: Annotated[int, Field(ge=0)] = 0
    bytes_sent: Annotated[int, Field(ge=0)] = 0
    seconds: Annotated[float, Field(ge=0)] = 0.0


SESSION_PLANE: tuple[type[Message], ...] = (Announce, Join, Offer, NoSession, Status, Done, Failed, Drop, Ack,
                                            ManifestGet, ManifestPart)
CONTROL_PLANE: tuple[type[Message], ...] = (DeployRequest, SessionJob, CancelSession, ClientResult, SessionReport)
ALL_MESSAGES: tuple[type[Message], ...] = (*SESSION_PLANE, *CONTROL_PLANE, ImageRef, Tier, Target)
