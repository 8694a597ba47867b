"""A module's variables schema as the OpenAPI document shows it to callers: what the
request body parser (`jsonbody`) refuses stated in it (the number limits), Terraform's
`any` as `AnyValue`, and shapes code generators can read."""

from __future__ import annotations

from typing import Any

from .jsonbody import MAX_DIGITS, MAX_EXPONENT

#: Where the document's `AnyValue` schema is.
_ANY_VALUE = "#/components/schemas/AnyValue"

#: Numbers `jsonbody` accepts, as JSON Schema keywords: zero, or from 1e-300 to 1e100 in
#: size. The server takes up to 1e300 but no more than 100 significant digits, and a
#: schema cannot count digits: an integer below 1e100 never has more, and a whole number
#: (every float from 2**53 up is one) cannot be told from an integer written out in full.
#: So a little stricter than the server, never looser.
NUMBER_LIMITS: dict[str, Any] = {
    "minimum": -float(f"1e{MAX_DIGITS}"),
    "maximum": float(f"1e{MAX_DIGITS}"),
    "not": {"type": "number", "exclusiveMinimum": -float(f"1e-{MAX_EXPONENT}"),
            "exclusiveMaximum": float(f"1e-{MAX_EXPONENT}"), "not": {"const": 0}},
}


_SUBSCHEMA_KEYS = ("items", "additionalProperties")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SCHEMA_VALUES = ("default", "const", "enum", "examples")
#: Keywords about a value as a whole, kept outside `anyOf` when a schema is split.
_OUTER = ("description", "title", "writeOnly", "readOnly", "deprecated")
_STRUCTURE = frozenset({"type", "$ref", "anyOf", "oneOf", "allOf", "const", "enum", "not"})


def request_schema(schema: Any) -> Any:
    """A module's variables schema as the document shows it: a new tree (the module's is
    never changed) with the number limits wherever a number may be, `any` as `AnyValue`,
    and tuples without the `items: false` that `maxItems` already says."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$schema":
            continue  # the document's dialect (2020-12 based) applies
        if key in _SCHEMA_VALUES:
            out[key] = value
        elif key == "properties" and isinstance(value, dict):
            out[key] = {n: request_schema(s) for n, s in value.items()}
        elif key in _SUBSCHEMA_KEYS:
            out[key] = request_schema(value)
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [request_schema(s) for s in value]
        else:
            out[key] = value
    if out.get("items") is False and isinstance(out.get("prefixItems"), list) \
            and out.get("maxItems") == len(out["prefixItems"]):
        del out["items"]
    if _is_nullable_object(out) and isinstance(out.get("default"), dict):
        # The same schema, its default moved into the object branch: generators
        # (openapi-python-client) cannot give a nullable object a default of its own.
        outer = {k: out.pop(k) for k in _OUTER if k in out}
        out = {**outer, "anyOf": [{**out, "type": "object"}, {"type": "null"}]}
    elif not _STRUCTURE & out.keys():
        out["$ref"] = _ANY_VALUE
    elif _admits_numbers(out.get("type")):
        for key, value in NUMBER_LIMITS.items():
            if key == "not" and "not" in out:
                out["allOf"] = [*out.get("allOf", []), {"not": value}]
            else:
                out.setdefault(key, value)
    return out


def _is_nullable_object(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return isinstance(kind, list) and sorted(kind) == ["null", "object"]


def _admits_numbers(kind: Any) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    return "number" in kinds or "integer" in kinds
