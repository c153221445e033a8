"""Renders and lints the chart offline with Helm's own Go code (PyPI `helm-python-sdk`, Helm 4),
so CI needs no helm binary and no cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moge"
CI_VALUES = CHART / "ci"
BROKEN_VALUES = REPO / "helm" / "tests" / "broken"
RELEASE = "demo"
NAMESPACE = "serving"


def _helm():
    try:
        import helm_python
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("the chart tests need Helm's SDK: pip install -e .[dev] (helm-python-sdk)") from e
    helm_python.disable_logging()
    return helm_python


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's objects for these values (merged over values.yaml, as `helm template -f`)."""
    helm = _helm()
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return objects


def render_notes(values: dict[str, Any] | None = None) -> str:
    helm = _helm()
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for name, text in manifests.items() if name.endswith("NOTES.txt"))


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    return _helm().lint(CHART, values or {}, strict=True, namespace=NAMESPACE)


def render_error(values: dict[str, Any]) -> str:
    """The message Helm stops with for invalid values (a `fail` or the values schema)."""
    helm = _helm()
    try:
        render(values)
    except (helm.HelmRenderError, helm.HelmValuesError) as e:
        return str(e)
    raise AssertionError(f"the chart rendered values it should refuse: {values}")


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {[o['metadata']['name'] for o in found]}"
    return found[0]
