"""TEST FEATURE: damage arriving data packets the way a bad network would.

Portable, pure logic (seeded).  Like NORM's receive-loss knob, this lets real
socket tests prove the transport against loss, bursts of loss
(Gilbert-Elliott), reordering, duplication and corruption without a netem
qdisc (which these machines lack).  Never enabled unless asked for on the
command line, and the client says so loudly when it is.

Spec: comma-separated ``name=value`` (percentages): ``loss=2``,
``burst=P:LEN`` (enter a loss burst with P % per packet, mean length LEN
packets), ``reorder=25`` (hold a packet back behind 1-3 later ones),
``dup=5``, ``corrupt=1`` (flip one byte), ``cap=MBPS`` (take in at most MBPS
Mbit/s, dropping what overflows a 256 KiB buffer: a slow machine).
Example: ``loss=1,reorder=25,dup=5``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Impairment:
    loss: float = 0.0
    burst_enter: float = 0.0
    burst_len: float = 0.0
    reorder: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    cap: float = 0.0  # bytes/s taken in (0: unlimited)
    seed: int | None = None
    dropped: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _bad: bool = field(default=False, init=False, repr=False)
    _held: list[list] = field(default_factory=list, init=False, repr=False)  # [packet, packets still to wait]
    _queue: float = field(default=0.0, init=False, repr=False)
    _drained_at: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @classmethod
    def parse(cls, spec: str, seed: int | None = None) -> Impairment:
        """Build from a spec string; raises ValueError with a clear message."""
        kw: dict[str, float] = {}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = item.partition("=")
            try:
                if name == "burst":
                    enter, _, length = value.partition(":")
                    kw["burst_enter"], kw["burst_len"] = float(enter) / 100, float(length or 8)
                elif name in ("loss", "reorder", "corrupt"):
                    kw[name] = float(value) / 100
                elif name == "dup":
                    kw["duplicate"] = float(value) / 100
                elif name == "cap":
                    kw["cap"] = float(value) * 1e6 / 8
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"bad impairment {item!r} "
                                 "(use loss=, burst=P:LEN, reorder=, dup=, corrupt=, cap=)") from None
        return cls(seed=seed, **kw)

    @property
    def active(self) -> bool:
        return any((self.loss, self.burst_enter, self.reorder, self.duplicate, self.corrupt, self.cap))

    def feed(self, pkt: bytes, now: float = 0.0) -> list[bytes]:
        """The datagrams to deliver now, given one that just arrived (possibly none, or several)."""
        rng = self._rng
        out: list[bytes] = []
        if self.cap:
            self._queue = max(0.0, self._queue - (now - self._drained_at) * self.cap)
            self._drained_at = now
            if self._queue + len(pkt) > 256 * 1024:
                self.dropped += 1
                return out
            self._queue += len(pkt)
        for held in self._held:
            held[1] -= 1
        while self._held and self._held[0][1] <= 0:
            out.append(self._held.pop(0)[0])
        if self.burst_enter:
            if self._bad:
                self._bad = rng.random() >= 1.0 / max(1.0, self.burst_len)
            else:
                self._bad = rng.random() < self.burst_enter
            if self._bad:
                self.dropped += 1
                return out
        if rng.random() < self.loss:
            self.dropped += 1
            return out
        if rng.random() < self.corrupt and pkt:
            damaged = bytearray(pkt)
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
            pkt = bytes(damaged)
        copies = 2 if rng.random() < self.duplicate else 1
        for _ in range(copies):
            if rng.random() < self.reorder:
                self._held.append([pkt, rng.randint(1, 3)])
            else:
                out.append(pkt)
        return out
