"""ESP32 node simulator (contract §2–§5): `python -m tools.node_sim --help`."""
from .faults import SensorFault
from .fleet import Simulator
from .layout import ChannelSpec, NodeSpec, default_channels, layout_from_db, synthetic_layout
from .options import SimOptions
from .reservoir import Reservoir, ReservoirParams

__all__ = ["ChannelSpec", "NodeSpec", "Reservoir", "ReservoirParams", "SensorFault", "SimOptions", "Simulator",
           "default_channels", "layout_from_db", "synthetic_layout"]
