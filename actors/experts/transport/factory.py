"""The transport named in the config (`data_plane.transport`). A module of its own so that base.py
imports no implementation and every implementation can import base.py without a cycle."""

from __future__ import annotations

from typing import Any

from actors.experts.transport.base import ExpertTransport


def make_transport(name: str, **options: Any) -> ExpertTransport:
    """Options per kind are documented in each transport's module."""
    if name == "grpc":
        from actors.experts.transport.grpc import GrpcTransport

        return GrpcTransport(**options)
    if name == "collective":
        from actors.experts.transport.collective import CollectiveTransport

        return CollectiveTransport(**options)
    if name == "inprocess":
        from actors.experts.transport.inprocess import InProcessTransport

        return InProcessTransport(**options)
    raise ValueError(f"unknown transport {name!r}; expected grpc, collective or inprocess")
