"""Terraform type constraints to JSON Schema: parsed as tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tfserver.errors import ConfigError, InvalidInput
from tfserver.module.discover import load_module
from tfserver.module.types import TypeSyntaxError, parse_type, to_schema


@pytest.mark.parametrize(
    ("text", "schema"),
    [
        (None, {}),
        ("string", {"type": "string"}),
        ("${number}", {"type": "number"}),
        ("bool", {"type": "boolean"}),
        ("any", {}),
        ("${list(string)}", {"type": "array", "items": {"type": "string"}}),
        ("set(number)", {"type": "array", "items": {"type": "number"}, "uniqueItems": True}),
        ("map(bool)", {"type": "object", "additionalProperties": {"type": "boolean"}}),
        ("list(any)", {"type": "array", "items": {}}),
        ("tuple([string, number])", {"type": "array", "prefixItems": [
            {"type": "string"}, {"type": "number"}], "items": False, "minItems": 2,
            "maxItems": 2}),
        ("object({a = string, b = optional(number, 3)})", {
            "type": "object",
            "properties": {"a": {"type": "string"},
                           "b": {"type": ["number", "null"], "default": 3}},
            "required": ["a"],
            "additionalProperties": False}),
        ('${object({tier = string, tags = optional(map(string), {})})}', {
            "type": "object",
            "properties": {"tier": {"type": "string"},
                           "tags": {"type": ["object", "null"],
                                    "additionalProperties": {"type": "string"},
                                    "default": {}}},
            "required": ["tier"],
            "additionalProperties": False}),
        ('object({"quoted" = bool})', {
            "type": "object", "properties": {"quoted": {"type": "boolean"}},
            "required": ["quoted"], "additionalProperties": False}),
        ("object({\n  a = string\n  b = list(object({c = number}))\n})", {
            "type": "object",
            "properties": {"a": {"type": "string"}, "b": {"type": "array", "items": {
                "type": "object", "properties": {"c": {"type": "number"}},
                "required": ["c"], "additionalProperties": False}}},
            "required": ["a", "b"], "additionalProperties": False}),
        ('object({x = optional(list(string), ["a", "b"]), y = optional(object({z = bool}),'
         " {z = true})})", {
            "type": "object",
            "properties": {
                "x": {"type": ["array", "null"], "items": {"type": "string"},
                      "default": ["a", "b"]},
                "y": {"type": ["object", "null"], "properties": {"z": {"type": "boolean"}},
                      "required": ["z"], "additionalProperties": False,
                      "default": {"z": True}}},
            "required": [], "additionalProperties": False}),
    ],
)
def test_type_to_schema(text: str | None, schema: dict[str, Any]) -> None:
    assert to_schema(parse_type(text)) == schema
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("text", ["strin", "list(", "list(string", "object({a})",
                                  "tuple(string)", "map(string) extra", "object({a = })"])
def test_unreadable_types_are_errors(text: str) -> None:
    with pytest.raises(TypeSyntaxError):
        parse_type(text)


def test_type_round_trips_to_text() -> None:
    t = parse_type("object({a = optional(list(string), []), b = tuple([bool, number])})")
    assert str(t) == "object({a = optional(list(string), []), b = tuple([bool, number])})"


def test_module_variables_read_from_hcl(tmp_path: Path) -> None:
    (tmp_path / "v.tf").write_text('''
variable "req" {
  type        = string
  description = "needed"
}
variable "opt" {
  type    = number
  default = 2
}
variable "nn" {
  type     = string
  default  = "d"
  nullable = false
}
variable "sec" {
  type      = string
  sensitive = true
  default   = "hidden-default"
}
output "o" {
  value       = var.req
  description = "out"
}
output "s" {
  value     = var.sec
  sensitive = true
}
''')
    m = load_module(tmp_path, "mod")
    assert m.variables["req"].required and not m.variables["opt"].required
    assert m.variables["opt"].default == 2
    assert m.variables["nn"].nullable is False
    assert m.sensitive_variables == {"sec"}
    assert m.schema["required"] == ["req"]
    assert m.schema["properties"]["req"] == {"type": ["string", "null"], "description": "needed"}
    assert m.schema["properties"]["nn"] == {"type": "string", "default": "d"}
    # a sensitive default is never published in the schema
    assert "default" not in m.schema["properties"]["sec"]
    assert m.outputs["o"].description == "out" and m.outputs["s"].sensitive
    assert m.secret_values({"sec": "given-secret"}) == ["hidden-default", "given-secret"]
    with pytest.raises(InvalidInput) as err:
        m.validate({"req": "x", "nn": None, "extra": 1})
    assert [(e.field, e.message) for e in err.value.errors] == [
        ("extra", "unknown variable"), ("nn", "must be a string")]
    assert m.validate({"req": "x"}) == {"req": "x"}


def test_broken_hcl_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.tf").write_text('variable "x" {\n  type = string\n')
    with pytest.raises(ConfigError, match="cannot parse HCL"):
        load_module(tmp_path)
    (tmp_path / "bad.tf").write_text('variable "x" {\n  type = lisst(string)\n}\n')
    with pytest.raises(ConfigError, match="unknown type"):
        load_module(tmp_path)


def test_json_syntax_modules_are_read_too(tmp_path: Path) -> None:
    (tmp_path / "variables.tf.json").write_text(json.dumps({
        "variable": {
            "name": {"type": "string", "description": "who"},
            "sizes": {"type": "list(number)", "default": [1]},
            "secret": [{"type": "string", "sensitive": True, "default": None}],
        },
        "output": {"hello": {"value": "${var.name}", "description": "greeting"}},
    }))
    m = load_module(tmp_path, "jsonmod")
    assert m.schema["required"] == ["name"]
    assert m.schema["properties"]["sizes"]["items"] == {"type": "number"}
    assert m.sensitive_variables == {"secret"}
    assert m.outputs["hello"].description == "greeting"
    with pytest.raises(InvalidInput):
        m.validate({"sizes": ["x"]})
