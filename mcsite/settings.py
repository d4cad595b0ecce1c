"""Settings of every server-side component: one pydantic-settings model each.

Server side only.  Sources, highest first: constructor arguments, environment
variables (``MCDEPLOY_...``), the TOML file named by ``MCDEPLOY_CONFIG`` (tables
``[site]``, ``[controller]``, ``[dp]``), then the defaults below.  Defaults are
safe: multicast stays on loopback (127.0.0.1, TTL 1) until an administrator
names a real interface.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from mcproto.fec import DEFAULT_FEC


class _Component(BaseSettings):
    """Shared source order; subclasses name their TOML table in ``toml_table``."""

    toml_table: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("MCDEPLOY_CONFIG")
        if path:
            sources.append(_TableSource(settings_cls, path, cls.toml_table))
        return tuple(sources)


class _TableSource(PydanticBaseSettingsSource):
    """Reads one table of the site TOML file."""

    def __init__(self, settings_cls: type[BaseSettings], path: str, table: str) -> None:
        super().__init__(settings_cls)
        import tomllib

        from mcproto.errors import ConfigError

        try:
            with open(path, "rb") as fh:
                self._data: dict[str, Any] = tomllib.load(fh).get(table, {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read MCDEPLOY_CONFIG={path}: {exc}") from None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class SiteSettings(_Component):
    """Where the site's state and queues live."""

    model_config = SettingsConfigDict(env_prefix="MCDEPLOY_", extra="ignore")
    toml_table: ClassVar[str] = "site"

    redis_url: str = Field("", description="Redis URL for broker, results and state; empty = the "
                           "running `mcdeploy up` site, else an error telling how to get one.")
    key_prefix: str = Field("mcd", description="Prefix of every state key in Redis.")
    site_file: str = Field("", description="Where `mcdeploy up` publishes its Redis URL; empty = "
                           "$XDG_RUNTIME_DIR/mcdeploy/site.json or ~/.cache/mcdeploy/site.json.")


class ControllerSettings(_Component):
    """Central allocation of multicast groups and ports, and deployment defaults."""

    model_config = SettingsConfigDict(env_prefix="MCDEPLOY_CONTROLLER_", extra="ignore")
    toml_table: ClassVar[str] = "controller"

    group_prefix: str = Field("239.255.77.", description="Sessions get groups prefix+1..254 "
                              "(administratively scoped IPv4, RFC 2365); an IPv6 prefix such as 'ff15::77:' "
                              "gives IPv6 groups prefix+1..ffff (DPs then need mcast_interface6).")
    port_min: int = Field(47200, ge=1024, le=65535, description="Lowest data port for sessions.")
    port_max: int = Field(47999, ge=1024, le=65535, description="Highest data port for sessions.")
    start_timeout_s: float = Field(60.0, gt=0, description="Start with whoever joined after this.")
    default_rate_mbps: float = Field(400.0, gt=0, description="Rate tiers are derived from when a deployment "
                                     "names no rate (tier 2 = 1/3, tier 3 = 1/10); DPs cap it by their own maximum.")
    key_file: str = Field("", description="The controller's Ed25519 signing key (created on first use); empty = "
                          "$XDG_DATA_HOME/mcdeploy/controller.key. It signs image manifests; clients pin its "
                          "public key (`mcdeploy key`).")


class DPSettings(_Component):
    """One distribution point agent."""

    model_config = SettingsConfigDict(env_prefix="MCDEPLOY_DP_", extra="ignore")
    toml_table: ClassVar[str] = "dp"

    name: str = Field("dp1", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Queue is dp.<name>.")
    control_host: str = Field("127.0.0.1", description="Address of the UDP control port.")
    control_port: int = Field(47100, ge=0, le=65535, description="UDP port clients join on "
                              "(0 = any free port, for tests).")
    advertise_host: str = Field("", description="Address clients should use; empty = control_host.")
    mcast_interface: str = Field("127.0.0.1", description="IPv4 address of the interface multicast "
                                 "leaves by.  Loopback by default: set the DP's LAN address to "
                                 "serve real clients.")
    mcast_interface6: str = Field("", description="Interface (name, index or address) for IPv6 groups. "
                                  "No default: IPv6 multicast does not work on loopback, and the DP must never "
                                  "pick a real interface by itself.")
    mcast_ttl: int = Field(1, ge=0, le=255, description="Multicast TTL (IPv6 hop limit); 1 keeps it on the link.")
    max_rate_mbps: float = Field(400.0, gt=0, description="Ceiling of any session's send rate.")
    symbol_size: int = Field(1392, ge=256, le=8900, description="Payload bytes per datagram; 1,392 + the "
                             "56 bytes of a sealed packet + UDP + IPv6 fit a 1,500-byte MTU without fragmenting.")
    encrypt: bool = Field(True, description="Seal every packet with a per-session key handed to each client "
                          "(wrapped to its own key, offer signed by this DP's identity).")
    key_file: str = Field("", description="This DP's Ed25519 identity key (created on first start); empty = "
                          "$XDG_DATA_HOME/mcdeploy/dp-<name>.key. Clients pin its fingerprint.")
    spool_dir: str = Field("", description="Where results wait (one fsynced file each) until the controller has "
                           "them, surviving Redis outages and agent restarts; empty = "
                           "$XDG_DATA_HOME/mcdeploy/spool-<name>; 'memory' = not durable.")
    fec: Literal["rs16", "rs"] = Field(DEFAULT_FEC, description="Erasure code: rs16 (Reed-Solomon over GF(2^16), "
                                       "blocks up to 32,768 symbols) or rs (zfec, GF(2^8), blocks up to 255).")
    block_symbols: int = Field(1024, ge=1, le=32768, description="Source symbols per Reed-Solomon block (k; "
                               "<= 255 with fec rs, default 128 there). Larger k: less repair overhead with many "
                               "receivers, more memory per block.")
    repair_symbols: int = Field(0, ge=0, le=32768, description="fec rs16: repair symbol ids per block (R; 0 = "
                                "the power of two >= k, at least 64). fec rs: must be 0 (256 - k, implied).")

    @model_validator(mode="after")
    def _fec_geometry(self) -> DPSettings:
        if "block_symbols" not in self.model_fields_set:  # the default k is per code (and symbol size)
            from mcproto.fec import default_k

            self.block_symbols = default_k(self.fec, self.symbol_size)
        if self.fec == "rs" and (self.block_symbols > 255 or self.repair_symbols):
            raise ValueError("fec rs: block_symbols must be <= 255 and repair_symbols 0")
        if self.fec == "rs16" and self.symbol_size % 2:
            raise ValueError("fec rs16: symbol_size must be even")
        return self

    http_port: int = Field(0, ge=-1, le=65535, description="TCP port of the unicast fallback's HTTP server "
                           "(on control_host; offers name its URL): 0 = any free port, -1 = no unicast fallback.")
    http_rate_mbps: float = Field(0.0, ge=0, description="Unicast fallback: ceiling of each HTTP transfer's rate "
                                  "(0 = none).")
    concurrency: int = Field(4, ge=1, le=64, description="Sessions this agent runs at once.")
    heartbeat_s: float = Field(5.0, gt=0, description="How often the agent registers itself.")
