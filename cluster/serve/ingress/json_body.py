"""Request bodies parsed once, with a bounded nesting depth, before anything looks into them.

`json.loads` recurses once per nesting level: a body nested ~1,000 deep raises RecursionError (a 500
if nobody catches it) and anything a little shallower reaches pydantic, the tool-call parser and the
range checks as deep Python structures. `loads_bounded` measures the depth first, in C-speed passes
over the bytes (strings removed, brackets mapped to +1/-1, running maximum), and refuses a deeper
document with a 400 that names the limit; only then is it parsed.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from cluster.serve.errors import InvalidRequest

MAX_JSON_DEPTH = 64  # nesting levels of objects and arrays in any body or tool-call arguments

_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def depth(data: bytes) -> int:
    """The deepest nesting of objects and arrays in a JSON text (valid or not)."""
    steps = _STEP[np.frombuffer(_STRINGS.sub(b"", data), dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def loads_bounded(data: bytes | str, max_depth: int = MAX_JSON_DEPTH, what: str = "The request body") -> Any:
    """Parse JSON nested at most `max_depth` deep; InvalidRequest (400) otherwise or if invalid."""
    raw = data.encode() if isinstance(data, str) else data
    if depth(raw) > max_depth:
        raise InvalidRequest(f"{what} is nested deeper than the limit of {max_depth} levels",
                             code="json_too_deep")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: cannot happen below the limit
        raise InvalidRequest(f"{what} is not valid JSON: {e}", code="invalid_json") from None


def check_choices(body: Any, max_n: int) -> None:
    """`n` and `best_of` before admission: a request that can never run is a 400, never a 429
    that a client honouring Retry-After would repeat forever."""
    if not isinstance(body, dict):
        return
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int:
            raise InvalidRequest(f"{name} must be an integer", param=name)
        if not 1 <= value <= max_n:
            raise InvalidRequest(f"{name} must be in [1, {max_n}], got {value}", param=name)
