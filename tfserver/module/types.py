"""Terraform type constraints: parse `object({a = optional(string, "x")})` and emit JSON Schema.

python-hcl2 hands a variable's `type` back as one string; Terraform's JSON never gives it
at all. This module turns that string into a `TfType` tree (pure, no I/O), and the tree
into a JSON Schema (draft 2020-12, which OpenAPI 3.1 also speaks).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import TFServerError

PRIMITIVES = ("string", "number", "bool", "any")
COLLECTIONS = ("list", "set", "map")

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_-]*)
      | (?P<punct>[(){}\[\],=:])
    )""",
    re.VERBOSE,
)


class TypeSyntaxError(TFServerError):
    """A type constraint this parser cannot read."""


@dataclass(frozen=True)
class Attribute:
    """One attribute of an object type."""

    type: TfType
    optional: bool = False
    default: Any = None


@dataclass(frozen=True)
class TfType:
    """A Terraform type: a primitive, a collection, an object or a tuple."""

    kind: str
    element: TfType | None = None
    attributes: dict[str, Attribute] = field(default_factory=dict)
    items: tuple[TfType, ...] = ()

    def __str__(self) -> str:
        if self.kind in PRIMITIVES:
            return self.kind
        if self.kind in COLLECTIONS:
            return f"{self.kind}({self.element})"
        if self.kind == "tuple":
            return "tuple([" + ", ".join(str(i) for i in self.items) + "])"
        parts = []
        for name, attr in self.attributes.items():
            text = str(attr.type)
            if attr.optional:
                text = f"optional({text}" + (
                    f", {json.dumps(attr.default)})" if attr.default is not None else ")"
                )
            parts.append(f"{name} = {text}")
        return "object({" + ", ".join(parts) + "})"


ANY = TfType("any")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise TypeSyntaxError(f"cannot read type {text!r} at {text[pos:pos + 20]!r}")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok[0] == "end" or (value is not None and tok[1] != value):
            want = f"{value!r}" if value else "more"
            raise TypeSyntaxError(f"type {self.text!r}: expected {want}, found {tok[1]!r}")
        self.i += 1
        return tok

    def skip_comma(self) -> None:
        if self.peek()[1] == ",":
            self.i += 1

    def parse(self) -> TfType:
        t = self.type()
        if self.peek()[0] != "end":
            raise TypeSyntaxError(f"type {self.text!r}: unexpected {self.peek()[1]!r}")
        return t

    def type(self) -> TfType:
        kind, name = self.take()
        if kind != "ident":
            raise TypeSyntaxError(f"type {self.text!r}: expected a type name, found {name!r}")
        if name in PRIMITIVES:
            return TfType(name)
        if name in COLLECTIONS:
            self.take("(")
            element = self.type()
            self.take(")")
            return TfType(name, element=element)
        if name == "object":
            self.take("(")
            self.take("{")
            attributes: dict[str, Attribute] = {}
            while self.peek()[1] != "}":
                key_kind, key = self.take()
                if key_kind == "string":
                    key = json.loads(key)
                elif key_kind != "ident":
                    raise TypeSyntaxError(f"type {self.text!r}: bad attribute name {key!r}")
                if self.peek()[1] not in ("=", ":"):
                    raise TypeSyntaxError(f"type {self.text!r}: expected '=' after {key!r}")
                self.i += 1
                attributes[key] = self.attribute()
                self.skip_comma()
            self.take("}")
            self.take(")")
            return TfType("object", attributes=attributes)
        if name == "tuple":
            self.take("(")
            self.take("[")
            items: list[TfType] = []
            while self.peek()[1] != "]":
                items.append(self.type())
                self.skip_comma()
            self.take("]")
            self.take(")")
            return TfType("tuple", items=tuple(items))
        raise TypeSyntaxError(f"type {self.text!r}: unknown type {name!r}")

    def attribute(self) -> Attribute:
        if self.peek() == ("ident", "optional"):
            self.i += 1
            self.take("(")
            t = self.type()
            default = None
            if self.peek()[1] == ",":
                self.i += 1
                default = self.literal()
            self.take(")")
            return Attribute(t, optional=True, default=default)
        return Attribute(self.type())

    def literal(self) -> Any:
        kind, value = self.take()
        if kind == "string":
            return json.loads(value)
        if kind == "number":
            return json.loads(value)
        if kind == "ident" and value in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[value]
        if value == "[":
            out = []
            while self.peek()[1] != "]":
                out.append(self.literal())
                self.skip_comma()
            self.take("]")
            return out
        if value == "{":
            obj: dict[str, Any] = {}
            while self.peek()[1] != "}":
                key_kind, key = self.take()
                key = json.loads(key) if key_kind == "string" else key
                if self.peek()[1] not in ("=", ":"):
                    raise TypeSyntaxError(f"type {self.text!r}: expected '=' after {key!r}")
                self.i += 1
                obj[key] = self.literal()
                self.skip_comma()
            self.take("}")
            return obj
        raise TypeSyntaxError(f"type {self.text!r}: cannot read default {value!r}")


def parse_type(text: str | None) -> TfType:
    """Parse a type constraint as python-hcl2 returns it (`${...}` or bare); None is `any`."""
    if text is None:
        return ANY
    body = text.strip()
    if body.startswith("${") and body.endswith("}"):
        body = body[2:-1]
    return _Parser(body).parse()


def to_schema(t: TfType) -> dict[str, Any]:
    """The JSON Schema that accepts exactly the JSON values Terraform takes for `t`.

    Stricter than Terraform on purpose: Terraform turns `12345` into `"12345"` and drops
    unknown object attributes silently; an API caller is better served by a 400 that
    names the mistake.
    """
    if t.kind == "string":
        return {"type": "string"}
    if t.kind == "number":
        return {"type": "number"}
    if t.kind == "bool":
        return {"type": "boolean"}
    if t.kind == "any":
        return {}
    if t.kind in ("list", "set"):
        assert t.element is not None
        schema: dict[str, Any] = {"type": "array", "items": to_schema(t.element)}
        if t.kind == "set":
            schema["uniqueItems"] = True
        return schema
    if t.kind == "map":
        assert t.element is not None
        return {"type": "object", "additionalProperties": to_schema(t.element)}
    if t.kind == "tuple":
        n = len(t.items)
        return {
            "type": "array",
            "prefixItems": [to_schema(i) for i in t.items],
            "items": False,
            "minItems": n,
            "maxItems": n,
        }
    properties: dict[str, Any] = {}
    for name, attr in t.attributes.items():
        sub = to_schema(attr.type)
        if attr.optional:
            # Terraform reads null for an optional attribute as "use the default".
            sub = nullable(sub)
            if attr.default is not None:
                sub["default"] = attr.default
        properties[name] = sub
    return {
        "type": "object",
        "properties": properties,
        "required": [n for n, a in t.attributes.items() if not a.optional],
        "additionalProperties": False,
    }


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` that also accepts null."""
    if schema == {}:
        return {}
    kind = schema.get("type")
    if isinstance(kind, str):
        # Keywords such as `items` only apply to their own type, so adding "null" to the
        # type list is enough, and keeps error messages simple.
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}
