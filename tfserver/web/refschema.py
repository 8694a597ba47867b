"""References in the OpenAPI document (issue 22): every variable of a request body is
its type or a reference to another instance's output, `{"$ref": "/<module>/<instance>
#/outputs/<name>"}`; the `?cascade=` parameter of an apply. Pure functions."""

from __future__ import annotations

from typing import Any

from ..module.refs import MAX_REF_LENGTH
from ..names import NAME_RE

_STRING = {"type": "string"}
_NAMED = {"type": "string", "pattern": NAME_RE.pattern}

REFERENCE = "Reference"
#: An object whose only key is `$ref`: what the server reads as a reference.
_ONLY_REF = {"type": "object", "required": ["$ref"], "maxProperties": 1}
#: Keywords about the value as a whole, kept outside `oneOf`.
_OUTER = ("description", "writeOnly")
_NAME = NAME_RE.pattern.strip("^$")


def reference_schema() -> dict[str, Any]:
    """The `Reference` component."""
    return {
        "type": "object",
        "description": "Another instance's output, resolved when the run starts: a JSON "
                       "Reference whose fragment is a JSON Pointer (RFC 6901) under "
                       "`/outputs`, such as `/network/prod#/outputs/subnets/0/id`. The "
                       "instance is the caller's own; a sensitive output goes only into "
                       "a sensitive variable.",
        "properties": {"$ref": {"type": "string", "maxLength": MAX_REF_LENGTH,
                                "pattern": f"^/{_NAME}/{_NAME}#/outputs/[^/]+(/.*)?$"}},
        "required": ["$ref"],
        "additionalProperties": False,
    }


def with_references(body: dict[str, Any]) -> dict[str, Any]:
    """A variables schema whose every variable is `oneOf` its type and a `Reference`
    (a type that could hold `{"$ref": ...}` itself, a map or `any`, is told not to)."""
    properties = body.get("properties")
    if not isinstance(properties, dict):
        return body
    return {**body, "properties": {n: _either(s) for n, s in properties.items()}}


def _either(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    outer = {k: schema[k] for k in _OUTER if k in schema}
    inner = {k: v for k, v in schema.items() if k not in outer}
    if _admits_reference(inner):
        # A sibling `not` (an `allOf` around the recursive `AnyValue` sends
        # openapi-spec-validator into endless recursion).
        inner = ({**inner, "not": _ONLY_REF} if "not" not in inner
                 else {"allOf": [inner, {"not": _ONLY_REF}]})
    return {**outer, "oneOf": [inner, {"$ref": f"#/components/schemas/{REFERENCE}"}]}


def _admits_reference(schema: dict[str, Any]) -> bool:
    """True when values of the schema may be an object with a `$ref` key alone."""
    if "$ref" in schema:
        return True  # `AnyValue`
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return any(isinstance(s, dict) and _admits_reference(s) for s in schema[key])
    kind = schema.get("type")
    if kind is None:
        return True
    kinds = [kind] if isinstance(kind, str) else kind
    return "object" in kinds and schema.get("additionalProperties", True) is not False


CASCADE = {"name": "cascade", "in": "query", "required": False,
           "description": "Once the apply succeeds, apply each instance that references "
                          "this one and whose referenced outputs changed, in dependency "
                          "order (asynchronous runs whose records say `triggered_by`).",
           "schema": {"type": "boolean", "default": False}}

#: The run record's fields of references.
RUN_REFERENCES = {
    "references": {"type": "array", "description": "The references resolved as the run "
                   "started.", "items": {
                       "type": "object", "required": ["ref", "serial", "variable"],
                       "properties": {"variable": _STRING, "ref": _STRING,
                                      "serial": {"type": ["integer", "null"]}}}},
    "triggered_by": {**_STRING, "description": "The run whose cascade started this one."},
}
#: An instance's fields of references.
INSTANCE_REFERENCES = {
    "used_by": {"type": "array", "description": "The instances whose variables reference "
                "this one.", "items": {
                    "type": "object", "required": ["instance", "module", "variable"],
                    "properties": {"module": _NAMED, "instance": _NAMED,
                                   "variable": _STRING}}},
    "outdated": {"type": "array", "items": {"type": "object"},
                 "description": "Its references whose instance changed since its last "
                                "apply: variable, ref, applied_serial, current_serial."},
}
REFERENCED_BY = {"type": "array", "items": _NAMED,
                 "description": "The modules whose instances reference it (of the "
                                "caller's instances)."}
