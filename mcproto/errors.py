"""The error root of mcdeploy and its few meaningful subclasses.

Split by blame, as h11 does: a peer or an operator sent something wrong
(``MessageError``, ``PacketError``), or local configuration/state is wrong
(``ConfigError``, ``NotFoundError``).  CLIs turn any ``McdeployError`` into one
clear line and a non-zero exit code, never a traceback.
"""


class McdeployError(Exception):
    """Root of every error mcdeploy raises on purpose."""


class MessageError(McdeployError, ValueError):
    """A coordination message (datagram or task body) failed to decode or validate.

    The one error type every decoder of untrusted coordination input raises.
    """


class PacketError(McdeployError, ValueError):
    """A binary data-plane packet is malformed, foreign or out of range."""


class ForeignPacket(PacketError):
    """A well-formed packet of another session on the same group and port: not ours, not an attack.

    Counted apart from packets that fail authentication, so "rejected" means forged or damaged.
    """


class ConfigError(McdeployError):
    """Settings or the local environment make the requested action impossible."""


class NotFoundError(McdeployError):
    """An operator named something (image, DP, deployment) that does not exist."""
