"""A lower bound on the output a constraint needs, to refuse a request whose `max_new_tokens` cannot
hold any output the grammar accepts (a 400 before it is queued, rather than a certain `length` cut).
Sound, not tight: a request it lets through may still be cut, which then ends with `length`."""

from __future__ import annotations

import importlib
import json
import math
import re
from typing import Any

try:  # Python's own regex parser (re._parser since 3.11, sre_parse before)
    _sre_parse = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover - Python 3.10
    _sre_parse = importlib.import_module("sre_parse")

from radixfair.engine.constrained.base import GrammarSpec

MAX_REF_DEPTH = 16


def min_output_bytes(spec: GrammarSpec) -> int:
    """Bytes in the shortest output `spec` accepts, or a lower bound of it (0 when unknown)."""
    if spec.kind == "regex":
        return regex_min_chars(spec.text)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.text)
        except json.JSONDecodeError:
            return 0
        return json_min_bytes(schema, schema, 0)
    return 0  # ebnf: no bound


def min_output_tokens(spec: GrammarSpec, max_token_bytes: int) -> int:
    """No token spells more than `max_token_bytes` bytes, so this many tokens at least."""
    return math.ceil(min_output_bytes(spec) / max(max_token_bytes, 1))


def regex_min_chars(pattern: str) -> int:
    """Python's regex parser knows each pattern's minimum width; a pattern in the grammar library's
    syntax that Python does not read gets no bound. A character is at least one byte."""
    try:
        return int(_sre_parse.parse(pattern).getwidth()[0])
    except (re.error, AttributeError, TypeError, ValueError, OverflowError, RecursionError):
        return 0


def _dumps_len(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def json_min_bytes(schema: Any, root: Any, depth: int) -> int:
    """Bytes of the shortest compact JSON instance of `schema` (a lower bound where a keyword is not
    modelled: every branch here can only under-count)."""
    if not isinstance(schema, dict) or depth > MAX_REF_DEPTH:
        return 0
    if "const" in schema:
        return _dumps_len(schema["const"])
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return min(_dumps_len(v) for v in schema["enum"])
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target: Any = root
        for part in ref[1:].split("/"):
            if part and isinstance(target, dict):
                target = target.get(part.replace("~1", "/").replace("~0", "~"))
        return json_min_bytes(target, root, depth + 1)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return min(json_min_bytes(s, root, depth + 1) for s in schema[key])
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        return max(json_min_bytes(s, root, depth + 1) for s in schema["allOf"])
    types = schema.get("type")
    if isinstance(types, list):
        return min((_type_min_bytes(t, schema, root, depth) for t in types), default=0)
    if isinstance(types, str):
        return _type_min_bytes(types, schema, root, depth)
    return 1  # any value: one digit at least


def _type_min_bytes(kind: str, schema: dict[str, Any], root: Any, depth: int) -> int:
    if kind == "object":
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = [k for k in schema.get("required", []) if isinstance(k, str)]
        body = 0
        for k in required:
            body += _dumps_len(k) + 1 + json_min_bytes(props.get(k, {}), root, depth + 1)
        return 2 + body + max(len(required) - 1, 0)
    if kind == "array":
        n = schema.get("minItems", 0)
        n = n if isinstance(n, int) and n > 0 else 0
        return 2 + n * json_min_bytes(schema.get("items", {}), root, depth + 1) + max(n - 1, 0)
    if kind == "string":
        n = schema.get("minLength", 0)
        n = n if isinstance(n, int) and n > 0 else 0
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            n = max(n, regex_min_chars(pattern.removeprefix("^").removesuffix("$")))
        return 2 + n
    if kind in ("integer", "number"):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if isinstance(lo, (int, float)) and lo > 0:
            return len(str(math.ceil(lo)))
        if isinstance(hi, (int, float)) and hi < 0:
            return len(str(math.floor(hi)))
        return 1
    if kind in ("boolean", "null"):
        return 4
    return 0
