"""The per-call carrier named in the config (`data_plane.transport`). A module of its own so that
base.py imports no implementation and every implementation can import base.py without a cycle."""

from __future__ import annotations

from typing import Any

from actors.experts.carriers.base import Carrier


def make_carrier(name: str, **options: Any) -> Carrier:
    """Options per kind are documented in each carrier's module."""
    if name == "grpc":
        from actors.experts.carriers.grpc_call import GrpcCarrier

        return GrpcCarrier(**options)
    if name == "collective":
        from actors.experts.carriers.collective import CollectiveCarrier

        return CollectiveCarrier(**options)
    if name == "inprocess":
        from actors.experts.carriers.inprocess import InProcessCarrier

        return InProcessCarrier(**options)
    raise ValueError(f"unknown transport {name!r}; expected grpc, collective or inprocess")
