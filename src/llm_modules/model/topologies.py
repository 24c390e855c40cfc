"""The topologies by name: the one place a topology's name is turned into its behaviour."""

from __future__ import annotations

from ..errors import LLMModulesError
from .bridge import BridgeTopology
from .fusion import FusionTopology
from .topology import Topology

TOPOLOGIES: dict[str, Topology] = {"bridge": BridgeTopology(), "fusion": FusionTopology()}


def topology_for(name: str) -> Topology:
    """The topology called ``name`` (``LLMModulesConfig.topology``)."""
    if name not in TOPOLOGIES:
        raise LLMModulesError(f"topology={name!r} is not supported; choose one of {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]
