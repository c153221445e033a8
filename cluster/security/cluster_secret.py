"""The cluster secret that authenticates replica -> expert-worker RPCs (gRPC `x-moge-auth`).

Created once per Ray cluster, at start (`ensure()` from start_elastic) or by whichever process needs
it first (a replica deployed from a Serve config on KubeRay), and kept in Ray's internal KV store.
It therefore travels only through Ray — to workers as an actor constructor argument, to replicas by
reading the KV — never on a command line or in an environment variable, and it is as well protected
as Ray itself (on the local cluster: Ray's own auth token, cluster/cli/local_cluster.py). A
put-if-absent makes concurrent first users agree on one value.
"""

from __future__ import annotations

import secrets

KV_NAMESPACE = "moge"
KV_KEY = "expert-rpc-secret"


def ensure() -> str:
    """The cluster's secret, created if nobody has yet. Needs a connected Ray (ray.init done)."""
    from ray.experimental import internal_kv

    current = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
    if current:
        return current.decode()
    internal_kv._internal_kv_put(KV_KEY, secrets.token_urlsafe(32), overwrite=False, namespace=KV_NAMESPACE)
    stored = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)  # whoever won the race
    return stored.decode()


def rotate_for_tests() -> None:  # pragma: no cover - used by tests that restart a cluster in-process
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(KV_KEY, namespace=KV_NAMESPACE)
