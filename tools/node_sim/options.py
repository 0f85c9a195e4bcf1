"""The simulator's settings: the broker, the fleet's behaviour and the reservoirs' starting point."""
from __future__ import annotations

from dataclasses import dataclass, field

from .reservoir import ReservoirParams


@dataclass
class SimOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    keepalive: int = 30
    topic_root: str = "hydro"
    client_prefix: str = "sim-"
    poll_ms: int = 0                  # override every sensor's poll interval (0: the channel's own)
    heartbeat_sec: float = 15.0
    hello_interval_sec: float = 30.0  # unregistered nodes repeat node_hello until configured
    hello_greenhouse: str = ""        # provisioning_meta.greenhouse_token in node_hello
    hello_zone_id: int | None = None
    drop_rate: float = 0.0            # probability of not answering a command
    malformed_rate: float = 0.0       # probability a telemetry / heartbeat payload is garbage
    offline_every_sec: float = 0.0    # take a random node offline (abruptly) this often
    offline_for_sec: float = 20.0     # ... for this long
    cooldown_divisor: float = 1.0     # >1 shortens pumps' min-off cooldown (fast tests)
    initial_ph: float = 6.3
    initial_ec: float = 1.1
    initial_level: float = 0.8
    reservoir: ReservoirParams = field(default_factory=ReservoirParams)
    tick_sec: float = 0.1
    seed: int | None = None
