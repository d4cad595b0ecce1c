"""Events the sans-I/O sender and receiver emit, named as facts (h11 style).

Pure: frozen dataclasses only.  Adapters pull them with ``next_event()`` and
turn them into side effects (relay to the controller, exit codes, logs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClientJoined:
    client_id: str
    address: str


@dataclass(frozen=True, slots=True)
class TransferStarted:
    reason: str
    clients: int


@dataclass(frozen=True, slots=True)
class ClientFinished:
    """A client reached a terminal state at the sender: done (verified) or failed."""

    client_id: str
    outcome: str  # "done" | "failed"
    reason: str
    sha256: str | None
    bytes: int
    seconds: float
    address: str


@dataclass(frozen=True, slots=True)
class ClientTooSlow:
    """Sender (tier policy): this client cannot keep up here; it was let go to move to a slower tier."""

    client_id: str
    recv_rate: float


@dataclass(frozen=True, slots=True)
class SessionFinished:
    reason: str
    clients_done: int
    clients_failed: int


@dataclass(frozen=True, slots=True)
class TransferComplete:
    """Receiver: every symbol is in; the adapter must now verify the output."""


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """Receiver: the DP recorded our result."""

    outcome: str
    reason: str


@dataclass(frozen=True, slots=True)
class GaveUp:
    """Receiver: the transfer cannot complete (sender gone, session over, no ack)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Moved:
    """Receiver: the DP moved us to another group (a slower tier); the adapter re-joins there."""

    group: str
    port: int


SenderEvent = ClientJoined | TransferStarted | ClientFinished | ClientTooSlow | SessionFinished
ReceiverEvent = TransferComplete | Acknowledged | GaveUp | Moved
