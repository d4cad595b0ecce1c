"""Process-wide objects of a running DP agent (its control port, relay, settings).

Server side.  The DP agent runs Celery with the threads pool, so tasks run in
this process and find the agent's single :class:`SessionHost` here.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dpagent.host import SessionHost
from dpagent.relay import Relay
from mcproto.errors import ConfigError
from mcsite.settings import DPSettings
from mcsite.state import State


@dataclass
class Runtime:
    settings: DPSettings
    host: SessionHost
    relay: Relay
    state: State
    identity: Ed25519PrivateKey | None = None


_current: Runtime | None = None


def install(rt: Runtime) -> None:
    global _current
    _current = rt


def current() -> Runtime:
    if _current is None:
        raise ConfigError("dp.* tasks run only inside `mcdeploy-dp` (no DP runtime in this worker)")
    return _current
