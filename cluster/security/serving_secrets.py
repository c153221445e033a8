"""Secrets of a deployment (API keys, admin keys, the Redis URL's password) kept out of every
actor's constructor and deployment arguments, which Ray shows in its dashboard, state API and
`serve status`.

`seal(config_dict)` (the driver or the Serve application builder) moves them into Ray's internal KV
store under a fresh random reference and returns the config without them, plus that reference (not
itself a secret: reading the KV needs Ray's own access). `unseal(config_dict)` (each replica, the
ingress, the controller) puts them back. MOGE_* environment variables (Kubernetes Secrets) still
apply on top when the config is loaded in the actor (cluster/config.py).
"""

from __future__ import annotations

import json
import secrets
from typing import Any
from urllib.parse import urlsplit, urlunsplit

KV_NAMESPACE = "moge"
REF_KEY = "_secrets_ref"
SECRET_FIELDS = (("server", "api_keys"), ("server", "admin_keys"), ("elastic", "redis_url"),
                 ("elastic", "redis_password"))


def without_password(url: str) -> str:
    """The URL with its userinfo's password removed (host, port and db stay: they tell the mode)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = (f"{parts.username}@" if parts.username else "") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def seal(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` (a MogeConfig dict) without its secrets, which go to Ray's KV. Needs a
    connected Ray. A config with no secrets comes back unchanged."""
    from ray.experimental import internal_kv

    public = json.loads(json.dumps(config))
    found: dict[str, Any] = {}
    for section, field in SECRET_FIELDS:
        value = (public.get(section) or {}).get(field)
        if value:
            found[f"{section}.{field}"] = value
            if field == "redis_url":
                public[section][field] = without_password(value)
            else:
                public[section].pop(field)
    if not found:
        return public
    ref = secrets.token_hex(16)
    internal_kv._internal_kv_put(f"serving-secrets/{ref}", json.dumps(found), namespace=KV_NAMESPACE)
    public[REF_KEY] = ref
    return public


def unseal(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the secrets `seal` took back in place (a config without a reference as is)."""
    config = dict(config)
    ref = config.pop(REF_KEY, None)
    if not ref:
        return config
    from ray.experimental import internal_kv

    stored = internal_kv._internal_kv_get(f"serving-secrets/{ref}", namespace=KV_NAMESPACE)
    if stored is None:
        raise RuntimeError(f"the deployment's secrets ({ref}) are not in Ray's KV store")
    for name, value in json.loads(stored).items():
        section, field = name.split(".")
        config[section] = {**(config.get(section) or {}), field: value}
    return config
