"""When a session starts and how its rate follows the receivers: policies of the sans-I/O sender.

Pure: frozen dataclasses and arithmetic on ``now`` values passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StartPolicy:
    """When the transfer starts; the first condition met wins (times are ``now`` values).

    With no condition at all the transfer starts as soon as one client has
    joined (auto-cast).  Nothing is ever sent before at least one client joined.
    """

    clients: int = 0  # start when this many clients joined (0: no such condition)
    delay: float | None = None  # start this long after the session opened
    at: float | None = None  # start at this time (the adapter maps wall clock to ``now``)

    def due(self, joined: int, opened_at: float, now: float) -> str | None:
        """The reason to start now, or None."""
        if joined < 1:
            return None
        if self.clients and joined >= self.clients:
            return f"{joined} client(s) joined"
        if self.delay is not None and now - opened_at >= self.delay:
            return "start delay elapsed"
        if self.at is not None and now >= self.at:
            return "start time reached"
        if not self.clients and self.delay is None and self.at is None:
            return "first client joined"
        return None

    def next_deadline(self, opened_at: float) -> float:
        times = [t for t in (None if self.delay is None else opened_at + self.delay, self.at) if t is not None]
        return min(times) if times else math.inf


@dataclass(frozen=True)
class RatePolicy:
    """How the send rate follows the receivers, and what happens to a client that cannot keep up.

    Adaptive rate (AIMD): every ``interval`` the sender looks at the worst loss among the clients
    that count (each measures the gaps in the symbol ids it receives, its own full socket buffer
    included).  Above ``loss_ceiling`` the rate is multiplied by ``decrease``; below half of it the
    rate grows by ``increase`` x max_rate, never beyond max_rate nor below ``min_rate``.  Loss that
    slowing down cannot cure (a bad link) is indistinguishable here: a path losing more than
    ``loss_ceiling`` makes the session run at ``min_rate``, which the FEC then covers.

    Slow clients (``slow_policy``):
    * ``hold``: everyone counts; the session slows to what the slowest client can take (down to
      ``min_rate``).
    * ``drop``: a client whose receive rate stays below ``drop_below`` (bytes/s) for ``slow_grace``
      seconds while the sender sends faster is dropped, told why and whether it may fall back to
      unicast (``unicast_fallback``); such a client does not slow the others meanwhile.
    * ``tier``: such a client is let go with a ``ClientTooSlow`` event instead, for
      :class:`mcproto.tiers.TieredSession` to move it to a slower stream (WDS multistream).
    """

    adaptive: bool = True
    min_rate: float = 1e6
    loss_ceiling: float = 0.08
    decrease: float = 0.85
    increase: float = 0.05
    interval: float = 0.25
    slow_policy: str = "hold"  # hold | drop | tier
    drop_below: float = 0.0
    slow_grace: float = 2.0
    unicast_fallback: bool = False
