"""Keeps the values table of helm/moge/README.md in step with the `# --` comments of values.yaml.

A value is documented when a `# -- text` comment block sits right above its key, or when it is a
mapping whose every key is documented. The table sits between the README's values markers.

    python helm/tools/values_table.py          # rewrite the table
    python helm/tools/values_table.py --check  # exit 1 if a value is undocumented or the table is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "moge"
BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"
KEY = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(?:\s|$)")
# Pools are a map keyed by the user's names; document the shape once, under a placeholder.
GENERIC = [(re.compile(r"^expertPools\.[^.]+"), "expertPools.<name>")]


@dataclass
class Value:
    path: str
    description: str
    default: object


def read_values(text: str) -> tuple[list[Value], list[str]]:
    """(documented values in file order, paths of undocumented values)."""
    data = yaml.safe_load(text)
    described: dict[str, str] = {}
    order: list[str] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and pending is not None:
            pending.append(stripped[1:].strip())
            continue
        match = KEY.match(line)
        if not match:
            if stripped and not stripped.startswith("#"):
                pending = None
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        path = ".".join(k for _, k in stack)
        order.append(path)
        if pending is not None:
            described[path] = " ".join(pending)
        pending = None
    values = [Value(p, described[p], _lookup(data, p)) for p in order if p in described]
    undocumented = [p for p in order if _is_leaf(data, p) and not _covered(p, described)]
    return values, undocumented


def _lookup(data: object, path: str) -> object:
    for part in path.split("."):
        data = data[part]  # type: ignore[index]
    return data


def _is_leaf(data: object, path: str) -> bool:
    value = _lookup(data, path)
    return not (isinstance(value, dict) and value)


def _covered(path: str, described: dict[str, str]) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:i]) in described for i in range(1, len(parts) + 1))


def _generic(path: str) -> str:
    for pattern, repl in GENERIC:
        path = pattern.sub(repl, path)
    return path


def table(values: list[Value]) -> str:
    rows = ["| Key | Default | Description |", "| --- | --- | --- |"]
    seen = set()
    for v in values:
        path = _generic(v.path)
        if path in seen:
            continue
        seen.add(path)
        default = json.dumps(v.default, sort_keys=False).replace("|", "\\|")
        description = v.description.replace("|", "\\|")
        rows.append(f"| `{path}` | `{default}` | {description} |")
    return "\n".join(rows)


def updated_readme(readme: str, values: list[Value]) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table(values)}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    values, undocumented = read_values((CHART / "values.yaml").read_text())
    if undocumented:
        print(f"values.yaml: values without a '# --' comment: {', '.join(undocumented)}", file=sys.stderr)
        return 1
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    new = updated_readme(readme, values)
    if args.check:
        if new != readme:
            print("helm/moge/README.md values table is stale: run python helm/tools/values_table.py", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(new)
    print(f"wrote the values table of {readme_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
