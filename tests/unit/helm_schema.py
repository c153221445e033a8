"""Strict offline validation of rendered Kubernetes objects, as the API server would do it.

- KubeRay kinds (ray.io/v1 RayService, RayCluster, RayJob): the CRD's openAPIV3Schema from
  ../shared/kuberay-crds/, made strict: every object schema that lists `properties` rejects any
  other field (the API server would prune it silently, hiding the typo), and lists marked
  `x-kubernetes-list-type: map` must not repeat a key.
- Built-in kinds: the strict JSON schemas shipped in the PyPI package `kubernetes-validate`.
- metadata of every object: the strict ObjectMeta schema of the same package.

Problems come back as readable lines: `RayService/demo: spec.rayClusterConfig...: message`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import referencing
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = Path(os.environ.get("MOGE_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
KUBE_VERSION = "1.33.0"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML

# The Prometheus Operator's CRDs are not available offline: its two kinds the chart renders are
# checked against the structure and required fields the operator defines (monitoring.coreos.com/v1),
# restricted to the fields this chart sets, every level strict (a misspelt field fails).
_DURATION = "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_ENDPOINT = {"type": "object", "additionalProperties": False, "required": ["port"], "properties": {
    "port": {"type": "string", "minLength": 1}, "path": {"type": "string", "pattern": "^/"},
    "interval": {"type": "string", "pattern": _DURATION}, "scheme": {"enum": ["http", "https"]}}}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}, "minProperties": 1}


def _monitor_schema(endpoints: str) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", endpoints], "properties": {
            "selector": {"type": "object", "additionalProperties": False, "required": ["matchLabels"],
                         "properties": {"matchLabels": _LABELS}},
            "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
            endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT}}}},
        "additionalProperties": False}


MONITORING_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _monitor_schema("endpoints"),
    ("monitoring.coreos.com/v1", "PodMonitor"): _monitor_schema("podMetricsEndpoints"),
}


def crds_available() -> bool:
    return CRD_DIR.is_dir() and any(CRD_DIR.glob("ray.io_*.yaml"))


def validate_object(obj: dict[str, Any]) -> list[str]:
    """Every problem of one object, empty when it would be accepted by a strict API server."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    label = f"{kind}/{(obj.get('metadata') or {}).get('name', '?')}"
    if not api_version or not kind:
        return [f"{label}: apiVersion and kind are required"]
    problems = [f"{label}: metadata.{p}" for p in _schema_errors(_object_meta_validator(), obj.get("metadata") or {})]
    crd = _crd_validators().get((api_version, kind))
    if crd is not None:
        problems += [f"{label}: {p}" for p in _schema_errors(crd[0], obj)]
        problems += [f"{label}: {p}" for p in _duplicate_map_keys(crd[1], obj, "")]
    elif (api_version, kind) in MONITORING_SCHEMAS:
        problems += [f"{label}: {p}" for p in _schema_errors(jsonschema.Draft7Validator(
            MONITORING_SCHEMAS[(api_version, kind)]), obj)]
    else:
        problems += [f"{label}: {p}" for p in _builtin_errors(obj)]
    return problems


def validate_objects(objects: list[dict[str, Any]]) -> list[str]:
    return [p for obj in objects for p in validate_object(obj)]


# ------------------------------------------------------------------------------------------ CRDs


@functools.cache
def _crd_validators() -> dict[tuple[str, str], tuple[jsonschema.Validator, dict]]:
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_LOADER)
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            # status is written by the operator, never by a chart.
            schema.get("properties", {}).pop("status", None)
            out[(f"{group}/{version['name']}", kind)] = (jsonschema.Draft7Validator(schema), schema)
    return out


def _strict(node: Any) -> Any:
    """OpenAPI v3 (structural CRD schema) to JSON schema that refuses unknown fields."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _strict(v) for k, v in node.items()}
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    if "properties" in node and "additionalProperties" not in node and not node.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        node["additionalProperties"] = False
    return node


def _duplicate_map_keys(schema: dict, value: Any, path: str) -> Iterator[str]:
    """Lists typed `map` (env, ports, containers, volumes, worker groups) must have unique keys."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield from _duplicate_map_keys(sub, item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        items = schema.get("items", {})
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen: set[tuple] = set()
            for item in value:
                ident = tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)
                if ident in seen:
                    yield f"{path}: duplicate entry {dict(zip(keys, ident))}"
                seen.add(ident)
        for i, item in enumerate(value):
            yield from _duplicate_map_keys(items, item, f"{path}[{i}]")


# -------------------------------------------------------------------------------------- built-in


def _builtin_errors(obj: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(e.absolute_path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no schema: {e.message}"]
    return []


@functools.cache
def _object_meta_validator() -> jsonschema.Validator:
    import kubernetes_validate

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBE_VERSION}-local-strict"
    if not base.is_dir():  # the package ships a few versions; take the newest one it has
        base = sorted((Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema").glob("v*-local-strict"))[-1]
    schema = json.loads((base / "objectmeta-meta-v1.json").read_text())
    defs = json.loads((base / "_definitions.json").read_text())
    # The definitions file names itself with $id; the object schemas refer to it by that id.
    registry = referencing.Resource.from_contents(defs) @ referencing.Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


# ----------------------------------------------------------------------------------------- shared


def _schema_errors(validator: jsonschema.Validator, value: Any) -> list[str]:
    errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_path(e.absolute_path) or '(root)'}: {e.message}" for e in errors]


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
