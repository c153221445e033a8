"""No secret in any actor's arguments: the session server runs with an API key, the CLI-style
elastic config path seals the Redis URL's password; neither appears in what Serve stores for its
deployments (their constructor arguments, in Ray's KV under Serve's namespace), while the replicas
still enforce the key."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_the_api_key_is_in_no_deployment_argument_and_still_enforced(moge_server):
    from ray.experimental import internal_kv

    blobs = []
    for key in internal_kv._internal_kv_list("", namespace="serve"):
        value = internal_kv._internal_kv_get(key, namespace="serve")
        if value:
            blobs.append(value)
    # the arguments are there in the clear (the model source is one of them), the key is not
    assert any(b"preset:tiny-moge" in b for b in blobs), "Serve stores its deployments' arguments in Ray's KV"
    secret = moge_server.api_key.encode()
    assert not [b for b in blobs if secret in b]
    assert httpx.get(f"{moge_server.base_url}/v1/models", timeout=30).status_code == 401
    with moge_server.http() as c:
        assert c.get("/v1/models").status_code == 200


def test_seal_moves_secrets_out_and_unseal_brings_them_back(ray_local):
    from cluster.security.serving_secrets import seal, unseal

    # secrets no hex reference can contain by chance
    config = {"server": {"api_keys": ["sk-api-secret"], "admin_keys": ["sk-admin-secret"], "port": 1},
              "elastic": {"redis_url": "redis://:redis-password@127.0.0.1:6390/0"}}
    public = seal(config)
    text = repr(public)
    assert "api-secret" not in text and "admin-secret" not in text and "redis-password" not in text
    assert public["elastic"]["redis_url"] == "redis://127.0.0.1:6390/0"  # the mode is still visible
    assert unseal(public) == config
