"""The governance policy (issue 13): the file's faults as one line each, limits resolved from
the widest scope to the narrowest, allowed values merged into the modules' schemas and
enforced before any terraform process, reserved variables, and the droplet module."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hcl2
import jsonschema
import pytest
from hcl2 import SerializationOptions

from support import ROOT, require_tool, start_server, terraform_shim
from tfserver.errors import BadRequest, ConfigError, InvalidInput
from tfserver.module.discover import Module, discover, load_module
from tfserver.module.limits import Limits, format_duration, parse_ttl
from tfserver.module.policy import Policy
from tfserver.module.policyfile import key_path, load_policy

SHOP = """
variable "size" {
  type = string
}
variable "count" {
  type    = number
  default = 1
}
variable "region" {
  type    = string
  default = "nyc3"
}
variable "password" {
  type      = string
  sensitive = true
  default   = null
}
variable "license" {
  type      = string
  sensitive = true
  default   = null
}
variable "spec" {
  type    = object({ tier = string, disk = optional(number, 10) })
  default = null
}
variable "keys" {
  type    = list(string)
  default = []
}
variable "labels" {
  type    = map(string)
  default = {}
}
variable "pair" {
  type    = tuple([string, number])
  default = null
}
variable "flag" {
  type    = bool
  default = false
}
variable "anything" {
  default = null
}
variable "tfserver_tenant" {
  type    = string
  default = ""
}
variable "tfserver_instance" {
  type = string
}
resource "terraform_data" "shop" {
  input = [var.size, var.count, var.tfserver_tenant, var.tfserver_instance]
}
output "size" {
  value = var.size
}
"""

OTHER = """
variable "x" {
  type    = string
  default = "a"
}
resource "terraform_data" "other" {
  input = var.x
}
"""


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Module]:
    """Two offline modules: `shop` (every kind of variable) and `other`."""
    root = tmp_path_factory.mktemp("modules")
    for name, text in (("shop", SHOP), ("other", OTHER)):
        (root / name).mkdir()
        (root / name / "main.tf").write_text(text)
    return discover(root)


def load(tmp: Path, text: str, modules: Mapping[str, Module]) -> Policy:
    path = tmp / "policy.toml"
    path.write_text(text)
    return load_policy(path, modules)


# -- the file's faults: each is one line naming the file, the key and the fault ------------

VAR = "[modules.shop.variables.{}]\n"
BAD = [
    ("[defualts]\nmax_runs_per_tenant = 2",
     "defualts: unknown key (expected defaults, modules, tenants, webhooks)"),
    ("[defaults]\nmax_runs = 2",
     "defaults.max_runs: unknown key (expected max_instances_per_tenant, max_runs_per_tenant, "
     "max_queued_per_tenant, default_ttl, max_ttl, require_approval, separate_approver)"),
    ('[defaults]\nmax_runs_per_tenant = "2"',
     'defaults.max_runs_per_tenant: must be a whole number, or "unlimited"'),
    ("[defaults]\nmax_runs_per_tenant = true",
     'defaults.max_runs_per_tenant: must be a whole number, or "unlimited"'),
    ("[defaults]\nmax_runs_per_tenant = 1.5",
     'defaults.max_runs_per_tenant: must be a whole number, or "unlimited"'),
    ("[modules.shop]\nmax_instances_per_tenant = -1",
     "modules.shop.max_instances_per_tenant: must not be negative"),
    ('[defaults]\ndefault_ttl = "soon"',
     'defaults.default_ttl: must be a duration such as "90m", "24h" or "7d", or "unlimited"'),
    ("[defaults]\ndefault_ttl = 3600",
     'defaults.default_ttl: must be a duration such as "90m", "24h" or "7d", or "unlimited"'),
    ('[defaults]\nmax_ttl = "0s"', "defaults.max_ttl: must be longer than 0"),
    ('[modules.shop]\nmax_ttl = "1d"\ndefault_ttl = "2d"',
     "modules.shop: default_ttl 2d is longer than max_ttl 1d"),
    ('[defaults]\ndefault_ttl = "7d"\n[modules.shop]\nmax_ttl = "90m"',
     "modules.shop: default_ttl 7d is longer than max_ttl 90m"),
    ('[defaults]\ndefault_ttl = "unlimited"\nmax_ttl = "1d"',
     'defaults: default_ttl is "unlimited" but max_ttl is 1d: instances would outlive the '
     "maximum"),
    ("modules = 3", "modules: must be a table"),
    ("[modules]\nshop = 3", "modules.shop: must be a table"),
    ("[modules.nope]\nmax_instances_per_tenant = 1",
     "modules.nope: no module nope is served (served: other, shop)"),
    ('[modules.shop.variables]\nsize = "small"', "modules.shop.variables.size: must be a table"),
    ("[modules.shop]\ncolour = 1",
     "modules.shop.colour: unknown key (expected max_instances_per_tenant, max_runs_per_tenant, "
     "default_ttl, max_ttl, require_approval, separate_approver, variables, drift_check, "
     "reconcile, cascade, default_version)"),
    (VAR.format("colour") + 'enum = ["x"]',
     "modules.shop.variables.colour: module shop has no variable colour (it has anything, "
     "count, flag, keys, labels, license, pair, password, region, size, spec)"),
    (VAR.format("tfserver_tenant") + 'enum = ["a"]',
     "modules.shop.variables.tfserver_tenant: is set by the server, so a policy cannot narrow "
     "it"),
    (VAR.format("size") + 'format = "email"',
     "modules.shop.variables.size.format: format is not allowed: JSON Schema treats it as a "
     "note, not a rule; use pattern"),
    (VAR.format("size") + 'type = "number"',
     "modules.shop.variables.size.type: type is not allowed: a policy only narrows a type, "
     "with enum, const, minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf, "
     "pattern, minLength, maxLength, minItems, maxItems, uniqueItems, minProperties, "
     "maxProperties, properties, items, additionalProperties"),
    (VAR.format("size") + "minimum = 1",
     "modules.shop.variables.size.minimum: applies to numbers, and this value is string"),
    (VAR.format("count") + 'pattern = "^1"',
     "modules.shop.variables.count.pattern: applies to strings, and this value is number"),
    (VAR.format("flag") + "maxLength = 1",
     "modules.shop.variables.flag.maxLength: applies to strings, and this value is bool"),
    (VAR.format("anything") + "minimum = 1",
     "modules.shop.variables.anything.minimum: applies to numbers, and this value is any"),
    (VAR.format("size") + 'enum = ["a", 2]',
     "modules.shop.variables.size.enum[1]: is not a value of type string"),
    (VAR.format("count") + 'const = "x"',
     "modules.shop.variables.count.const: is not a value of type number"),
    (VAR.format("size") + "enum = []",
     "modules.shop.variables.size.enum: must be a non-empty array of allowed values"),
    (VAR.format("size") + 'enum = "small"',
     "modules.shop.variables.size.enum: must be a non-empty array of allowed values"),
    (VAR.format("size") + 'enum = ["a", "b", "a"]',
     "modules.shop.variables.size.enum[2]: repeats enum[0]"),
    (VAR.format("size") + "enum = [1979-05-27]",
     "modules.shop.variables.size.enum[0]: must be a JSON value (a TOML date or time, infinity "
     "or nan is not)"),
    (VAR.format("size") + 'enum = ["abc", "x"]\nmaxLength = 2',
     "modules.shop.variables.size.enum[0]: is outside the other constraints here, so it "
     "could never be accepted"),
    (VAR.format("size") + "minLength = 5\nmaxLength = 3",
     "modules.shop.variables.size: minLength 5 is above maxLength 3: no value could pass"),
    (VAR.format("size") + "maxLength = -1",
     "modules.shop.variables.size.maxLength: must be a whole number of at least 0"),
    (VAR.format("count") + "minimum = 5\nmaximum = 3",
     "modules.shop.variables.count: no number is above or at 5 and below or at 3"),
    (VAR.format("count") + "minimum = 1\nexclusiveMaximum = 1",
     "modules.shop.variables.count: no number is above or at 1 and below 1"),
    (VAR.format("count") + "maximum = inf",
     "modules.shop.variables.count.maximum: must be a number"),
    (VAR.format("count") + 'minimum = "1"',
     "modules.shop.variables.count.minimum: must be a number"),
    (VAR.format("count") + "multipleOf = 0",
     "modules.shop.variables.count.multipleOf: must be greater than 0"),
    (VAR.format("count") + "minimum = 2",
     "modules.shop.variables.count: the module's default is outside these constraints, so a "
     "request that leaves it out would be refused"),
    (VAR.format("region") + 'enum = ["ams3", "fra1"]',
     "modules.shop.variables.region: the module's default is outside these constraints, so a "
     "request that leaves it out would be refused"),
    (VAR.format("keys") + "maxItems = 1.5",
     "modules.shop.variables.keys.maxItems: must be a whole number of at least 0"),
    (VAR.format("keys") + "uniqueItems = false",
     "modules.shop.variables.keys.uniqueItems: must be true (false would not narrow anything)"),
    (VAR.format("keys") + "[modules.shop.variables.keys.items]\nminimum = 1",
     "modules.shop.variables.keys.items.minimum: applies to numbers, and this value is string"),
    (VAR.format("pair") + "minItems = 1",
     "modules.shop.variables.pair.minItems: type tuple([string, number]) already sets "
     "minItems; a policy cannot change it"),
    (VAR.format("pair") + "[modules.shop.variables.pair.items]\nmaxLength = 1",
     "modules.shop.variables.pair.items: applies to list and set types, and this value is "
     "tuple([string, number])"),
    (VAR.format("size") + "[modules.shop.variables.size.items]\nmaxLength = 1",
     "modules.shop.variables.size.items: applies to list and set types, and this value is "
     "string"),
    (VAR.format("labels") + "[modules.shop.variables.labels.properties.x]\nmaxLength = 1",
     "modules.shop.variables.labels.properties: applies to object types, and this value is "
     "map(string); use additionalProperties"),
    (VAR.format("spec") + "[modules.shop.variables.spec.properties.colour]\nenum = [\"x\"]",
     "modules.shop.variables.spec.properties.colour: type object({tier = string, disk = "
     "optional(number, 10)}) has no attribute colour"),
    (VAR.format("spec") + "[modules.shop.variables.spec.properties.disk]\nmaximum = 5",
     "modules.shop.variables.spec.properties.disk: the module's default is outside these "
     "constraints, so a request that leaves it out would be refused"),
    (VAR.format("spec") + "properties = 1",
     "modules.shop.variables.spec.properties: must be a table"),
    ('[tenants."abc"]\ndefault_ttl = "1h"',
     "tenants.abc.default_ttl: unknown key (expected max_instances_per_tenant, "
     "max_runs_per_tenant, max_queued_per_tenant, require_approval, separate_approver, "
     "modules)"),
    ('[tenants."a.b".modules.nope]\nmax_instances_per_tenant = 1',
     'tenants."a.b".modules.nope: no module nope is served (served: other, shop)'),
    ('[tenants."a".modules.shop]\ndefault_ttl = "1h"',
     "tenants.a.modules.shop.default_ttl: unknown key (expected max_instances_per_tenant, "
     "max_runs_per_tenant, require_approval, separate_approver)"),
    ('[tenants.""]\nmax_runs_per_tenant = 1', 'tenants."": a client id cannot be empty'),
]


@pytest.mark.parametrize(("text", "line"), BAD, ids=[line.split(":")[0] for _, line in BAD])
def test_each_fault_is_one_line(tmp: Path, modules: dict[str, Module], text: str,
                                line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp, text, modules)
    assert str(caught.value) == f"{tmp / 'policy.toml'}: {line}"
    assert "\n" not in str(caught.value)


def test_syntax_errors_name_the_line(tmp: Path, modules: dict[str, Module]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp, "[defaults]\n\nmax_runs_per_tenant = \n", modules)
    assert re.fullmatch(rf"{re.escape(str(tmp / 'policy.toml'))}: not valid TOML: .*"
                        r"\(at line 3, column \d+\)", str(caught.value))
    with pytest.raises(ConfigError, match=r"is not a regular expression: .*at position 1$"):
        load(tmp, VAR.format("size") + 'pattern = "(["', modules)
    (tmp / "latin1.toml").write_bytes(b'[defaults]\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text \(byte 16\)$"):
        load_policy(tmp / "latin1.toml", modules)
    with pytest.raises(ConfigError, match=r"^TFSERVER_POLICY .*missing\.toml: cannot read "
                                          r"it: No such file or directory$"):
        load_policy(tmp / "missing.toml", modules)


def test_key_paths_quote_what_toml_would() -> None:
    assert key_path(("tenants", "a.b", "modules", "x")) == 'tenants."a.b".modules.x'
    assert key_path(("modules", "m", "variables", "v", "enum", 2)) == \
        "modules.m.variables.v.enum[2]"
    assert key_path(("tenants", "")) == 'tenants.""'


# -- limits: defaults < module < tenant < tenant's module ----------------------------------

GOOD = """
[defaults]
max_runs_per_tenant = 2
max_instances_per_tenant = 10
default_ttl = "24h"
max_ttl = "7d"

[modules.shop]
max_instances_per_tenant = 3
default_ttl = "90m"

[modules.other]
default_ttl = "unlimited"
max_ttl = "unlimited"

[tenants."big-client"]
max_runs_per_tenant = 5

[tenants."big-client".modules.shop]
max_instances_per_tenant = "unlimited"

[tenants."small.client".modules.shop]
max_instances_per_tenant = 0
max_runs_per_tenant = 1
"""

HOUR, DAY = 3600.0, 86400.0


def test_limits_resolve_from_the_widest_scope_to_the_narrowest(
        tmp: Path, modules: dict[str, Module]) -> None:
    policy = load(tmp, GOOD, modules)
    assert policy.limits("shop", None) == Limits(3, 2, 1.5 * HOUR, 7 * DAY)
    assert policy.limits("shop", "someone-else") == Limits(3, 2, 1.5 * HOUR, 7 * DAY)
    assert policy.limits("shop", "big-client") == Limits(None, 5, 1.5 * HOUR, 7 * DAY)
    assert policy.limits("other", "big-client") == Limits(10, 5, None, None)
    assert policy.limits("other", None) == Limits(10, 2, None, None)
    assert policy.limits("shop", "small.client") == Limits(0, 1, 1.5 * HOUR, 7 * DAY)
    assert policy.limits("other", "small.client") == Limits(10, 2, None, None)
    # a module the policy does not name gets the defaults
    assert policy.limits("elsewhere", None) == Limits(10, 2, DAY, 7 * DAY)
    # limits do not change what clients may send
    assert policy.narrowed(modules) == modules
    assert Policy.empty().limits("shop", "x") == Limits()
    assert load_policy(None, modules) == Policy.empty()
    assert load(tmp, "", modules).limits("shop", "x") == Limits()


def test_ttl_of_an_apply() -> None:
    limits = Limits(default_ttl=1.5 * HOUR, max_ttl=7 * DAY)
    assert limits.ttl(None) == 1.5 * HOUR
    assert limits.ttl(2.0) == 2.0
    assert limits.ttl(7 * DAY) == 7 * DAY
    with pytest.raises(BadRequest) as caught:
        limits.ttl(8 * DAY)
    assert caught.value.status == 400
    assert caught.value.extra["errors"] == [{"field": "ttl", "message": "must be at most 7d"}]
    # a maximum alone is also the default: no instance outlives it
    assert Limits(max_ttl=HOUR).ttl(None) == HOUR
    assert Limits().ttl(None) is None and Limits().ttl(10 * 365 * DAY) == 10 * 365 * DAY
    assert parse_ttl("2s") == 2.0 and parse_ttl("90m") == 5400.0 and parse_ttl("7d") == 7 * DAY
    for text in ("soon", "0", "-1h", "0s", ""):
        with pytest.raises(BadRequest) as caught:
            parse_ttl(text)
        assert caught.value.extra["errors"][0]["field"] == "ttl"
    assert [format_duration(s) for s in (7 * DAY, DAY, 1.5 * HOUR, 45, 2.5)] == \
        ["7d", "1d", "90m", "45s", "2.5s"]


# -- allowed values, merged into the schema and enforced --------------------------------

NARROW = """
[modules.shop.variables.size]
enum = ["small", "medium"]

[modules.shop.variables.count]
minimum = 1
maximum = 10
multipleOf = 1

[modules.shop.variables.region]
pattern = "^[a-z]{3}[0-9]$"

[modules.shop.variables.password]
minLength = 12

[modules.shop.variables.license]
enum = ["tier-std-7", "tier-pro-9"]

[modules.shop.variables.spec.properties.tier]
enum = ["basic", "premium"]

[modules.shop.variables.spec.properties.disk]
exclusiveMinimum = 0
maximum = 100

[modules.shop.variables.keys]
maxItems = 2
uniqueItems = true

[modules.shop.variables.keys.items]
pattern = "^ssh-"

[modules.shop.variables.labels]
maxProperties = 3

[modules.shop.variables.labels.additionalProperties]
maxLength = 5

[modules.shop.variables.flag]
const = false
"""


def test_constraints_are_merged_into_the_schema(tmp: Path, modules: dict[str, Module]) -> None:
    before = json.dumps(modules["shop"].schema, sort_keys=True)
    narrowed = load(tmp, NARROW, modules).narrowed(modules)
    schema = narrowed["shop"].schema
    jsonschema.Draft202012Validator.check_schema(schema)
    props = schema["properties"]
    assert props["size"] == {"type": ["string", "null"], "enum": ["small", "medium"]}
    assert props["count"] == {"type": ["number", "null"], "default": 1, "minimum": 1,
                              "maximum": 10, "multipleOf": 1}
    assert props["spec"]["properties"]["tier"]["enum"] == ["basic", "premium"]
    assert props["spec"]["properties"]["disk"] == {
        "type": ["number", "null"], "default": 10, "exclusiveMinimum": 0, "maximum": 100}
    assert props["keys"]["items"] == {"type": "string", "pattern": "^ssh-"}
    assert props["labels"]["additionalProperties"] == {"type": "string", "maxLength": 5}
    assert props["license"]["writeOnly"] is True
    # the module as read is left alone; the other module is the same object
    assert json.dumps(modules["shop"].schema, sort_keys=True) == before
    assert narrowed["other"] is modules["other"]
    assert narrowed["shop"].variables is modules["shop"].variables


def test_refusals_name_the_field_and_the_rule_never_the_value(
        tmp: Path, modules: dict[str, Module], monkeypatch: pytest.MonkeyPatch) -> None:
    shop = load(tmp, NARROW, modules).narrowed(modules)["shop"]

    def no_process(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validation started a process")

    # checked before any terraform process: validation is pure
    monkeypatch.setattr(subprocess, "Popen", no_process)
    body = {"size": "huge-Q7", "count": 99.5, "region": "Moon-Q7", "password": "short-Q7",
            "license": "tier-gold-Q7", "spec": {"tier": "gold-Q7", "disk": 0},
            "keys": ["rsa-Q7", "rsa-Q7", "x"], "labels": {"a": "long-Q7", "b": "", "c": "",
                                                          "d": ""},
            "flag": True, "tfserver_instance": "mine"}
    with pytest.raises(InvalidInput) as caught:
        shop.validate(body)
    assert [(e.field, e.message) for e in caught.value.errors] == [
        ("count", "must be a multiple of 1"),
        ("count", "must be at most 10"),
        ("flag", "must be false"),
        ("keys", "must have at most 2 items"),
        ("keys", "must not repeat an item (it is a set)"),
        ("keys[0]", "must match the pattern ^ssh-"),
        ("keys[1]", "must match the pattern ^ssh-"),
        ("keys[2]", "must match the pattern ^ssh-"),
        ("labels", "must have at most 3 entries"),
        ("labels.a", "must be at most 5 characters long"),
        ("license", "is not an allowed value"),
        ("password", "must be at least 12 characters long"),
        ("region", "must match the pattern ^[a-z]{3}[0-9]$"),
        ("size", "must be one of small, medium"),
        ("spec.disk", "must be greater than 0"),
        ("spec.tier", "must be one of basic, premium"),
        ("tfserver_instance", "is set by the server"),
    ]
    shown = json.dumps(caught.value.problem())
    assert "Q7" not in shown and "99" not in shown
    # a sensitive variable's allowed values are never listed next to its refusal
    assert "tier-std-7" not in shown and "tier-pro-9" not in shown
    good = {"size": "small", "count": 3, "region": "nyc3", "password": "long-enough-pw",
            "license": "tier-pro-9", "spec": {"tier": "basic"}, "keys": ["ssh-a"],
            "labels": {"a": "x"}, "flag": False}
    assert shop.validate(good) == good
    assert shop.validate({"size": "medium"}) == {"size": "medium"}


def test_enum_of_one_value_and_numbers_read_plainly(tmp: Path,
                                                    modules: dict[str, Module]) -> None:
    policy = load(tmp, VAR.format("size") + 'enum = ["only"]\n' + VAR.format("count") +
                  "enum = [1, 2.5, 4]\n", modules)
    shop = policy.narrowed(modules)["shop"]
    with pytest.raises(InvalidInput) as caught:
        shop.validate({"size": "other", "count": 3})
    assert [(e.field, e.message) for e in caught.value.errors] == [
        ("count", "must be one of 1, 2.5, 4"), ("size", "must be only")]


# -- reserved variables -----------------------------------------------------------------


def test_reserved_variables_are_the_servers(modules: dict[str, Module]) -> None:
    shop = modules["shop"]
    assert shop.reserved == {"tfserver_tenant", "tfserver_instance"}
    assert not shop.reserved & set(shop.schema["properties"])
    assert "tfserver_instance" not in shop.schema["required"]  # declared without a default
    with pytest.raises(InvalidInput) as caught:
        shop.validate({"size": "s", "tfserver_tenant": "someone-else", "colour": 1})
    assert [(e.field, e.message) for e in caught.value.errors] == [
        ("colour", "unknown variable"), ("tfserver_tenant", "is set by the server")]
    inputs = shop.validate({"size": "s"})
    filled = shop.fill_reserved(inputs, tenant="client-1", instance="web")
    assert filled == {"size": "s", "tfserver_tenant": "client-1", "tfserver_instance": "web"}
    assert inputs == {"size": "s"}  # not changed in place
    # a module that does not declare them: nothing is filled, and they are unknown
    other = modules["other"]
    assert other.reserved == frozenset()
    assert other.fill_reserved({"x": "a"}, tenant="t", instance="i") == {"x": "a"}
    with pytest.raises(InvalidInput) as caught:
        other.validate({"tfserver_module": "x"})
    assert [(e.field, e.message) for e in caught.value.errors] == [
        ("tfserver_module", "unknown variable")]


def test_a_reserved_variable_must_be_a_string(tmp: Path) -> None:
    (tmp / "main.tf").write_text('variable "tfserver_instance" {\n  type = number\n}\n')
    with pytest.raises(ConfigError) as caught:
        load_module(tmp, "m")
    assert str(caught.value) == (
        f"{tmp / 'main.tf'}: variable tfserver_instance: the server fills it with a string, "
        "so declare it with type = string, not number")
    (tmp / "main.tf").write_text('variable "tfserver_module" {}\n')
    with pytest.raises(ConfigError, match=r"type = string, not any$"):
        load_module(tmp, "m")


# -- the droplet module and the deployed policy -------------------------------------------

HCL = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
DROPLET = ROOT / "modules" / "droplet" / "1.1.0"  # the newest version
DO_TAG = re.compile(r"^[A-Za-z0-9:_-]{1,255}$")


def parse(path: Path) -> dict[str, Any]:
    return dict(hcl2.loads(path.read_text(), serialization_options=HCL))


def test_the_deployed_policy_narrows_the_droplet() -> None:
    served = discover(ROOT / "modules")
    policy = load_policy(ROOT / "deploy" / "policy.toml", served)
    assert policy.limits("droplet", None) == Limits(3, 2, DAY, 7 * DAY)
    assert policy.limits("demo", "any-client") == Limits(None, 2, None, None)
    droplet = policy.narrowed(served)["droplet"]
    props = droplet.schema["properties"]
    sizes = props["size"]["enum"]
    assert sizes and all(re.fullmatch(r"s-1vcpu-(512mb-10gb|1gb|2gb)", s) for s in sizes)
    assert "nyc3" in props["region"]["enum"]
    assert "name" not in droplet.schema["required"]
    assert droplet.reserved == {"tfserver_tenant", "tfserver_instance", "tfserver_module"}
    assert not droplet.reserved & set(props)
    body = {"image": "ubuntu-24-04-x64", "region": "nyc3", "size": "s-1vcpu-1gb"}
    assert droplet.validate(body) == body
    with pytest.raises(InvalidInput) as caught:
        droplet.validate({**body, "size": "g-8vcpu-32gb", "region": "mars1",
                          "tfserver_tenant": "someone-else"})
    assert [(e.field, e.message) for e in caught.value.errors] == [
        ("region", "must be one of " + ", ".join(props["region"]["enum"])),
        ("size", "must be one of " + ", ".join(sizes)),
        ("tfserver_tenant", "is set by the server")]
    assert droplet.fill_reserved(body, tenant="client-1", instance="web_1") == {
        **body, "tfserver_tenant": "client-1", "tfserver_instance": "web_1",
        "tfserver_module": "droplet"}


def test_the_droplet_is_named_and_tagged_after_its_owner() -> None:
    variables = {name: body for block in parse(DROPLET / "variables.tf")["variable"]
                 for name, body in block.items()}
    module = load_module(DROPLET)
    for name in ("tfserver_tenant", "tfserver_instance", "tfserver_module"):
        assert module.variables[name].type.kind == "string"
        assert variables[name]["default"] == "" and variables[name]["nullable"] is False
    droplet = parse(DROPLET / "main.tf")["resource"][0]["digitalocean_droplet"]["this"]
    assert droplet["name"] == "${local.name}" and droplet["tags"] == "${local.tags}"
    locals_ = parse(DROPLET / "naming.tf")["locals"][0]
    assert "var.name" in locals_["name"] and "local.instance_hostname" in locals_["name"]
    tags = locals_["server_tags"]
    assert '"tfserver-${kind}-' in tags
    for kind in ("tenant", "instance", "module"):
        assert f"{kind} = var.tfserver_{kind}" in tags
    assert "255" in tags and "[^A-Za-z0-9:_-]" in tags
    assert locals_["tags"] == "${concat(var.tags, local.server_tags)}"
    # naming.tf reads variables only, so terraform can evaluate it without the provider
    assert "resource" not in parse(DROPLET / "naming.tf")


def console(folder: Path, expression: str, variables: dict[str, str]) -> tuple[Any, str]:
    """Evaluate one expression of a provider-free module with `terraform console`: its value
    and what terraform said on stderr (a failed validation, printed beside the value)."""
    terraform = require_tool("terraform")
    args = [terraform, "console", "-no-color"]
    for name, value in variables.items():
        args += ["-var", f"{name}={value}"]
    done = subprocess.run(args, input=f"jsonencode({expression})\n", cwd=folder,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(folder),
                               "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": "/dev/null",
                               "TF_IN_AUTOMATION": "1", "NO_COLOR": "1"})
    assert done.returncode == 0 and "CRASH" not in done.stderr, done.stderr
    return json.loads(json.loads(done.stdout.strip().splitlines()[-1])), done.stderr


def test_the_droplets_name_and_tags_as_terraform_computes_them(tmp: Path) -> None:
    """The module's own expressions, evaluated by terraform: its provider cannot be
    downloaded here, but naming.tf and variables.tf need none."""
    for name in ("variables.tf", "naming.tf"):
        shutil.copy(DROPLET / name, tmp / name)
    base = {"image": "ubuntu-24-04-x64", "region": "nyc3", "size": "s-1vcpu-1gb"}
    served = {**base, "tfserver_tenant": "3kq1v.client/é", "tfserver_instance": "web_1-",
              "tfserver_module": "droplet"}
    got, said = console(tmp, "{name = local.name, tags = local.tags}",
                        {**served, "tags": '["env"]'})
    assert not said
    assert got == {"name": "web-1", "tags": ["env", "tfserver-instance-web_1-",
                                             "tfserver-module-droplet",
                                             "tfserver-tenant-3kq1v_client__"]}
    long_tenant = "t" * 300
    got, said = console(tmp, "{name = local.name, tags = local.tags}",
                        {**served, "tfserver_tenant": long_tenant, "name": "given.example"})
    assert not said
    assert got["name"] == "given.example"
    assert all(DO_TAG.match(tag) for tag in got["tags"])
    assert f"tfserver-tenant-{long_tenant}"[:255] in got["tags"]
    # standalone: no tfserver tags, and no name unless given
    assert console(tmp, "{name = local.name, tags = local.tags}", base) == \
        ({"name": "", "tags": []}, "")
    # a client cannot forge the server's tags (the variable's validation refuses them; asking
    # console for a local after a failed validation crashes terraform 1.11, so ask for none)
    _, said = console(tmp, "var.image", {**base, "tags": '["tfserver-tenant-other"]'})
    assert "Invalid value for variable" in said
    assert "do not start with tfserver-" in " ".join(said.split())


# -- the server: a bad policy stops the start; a good one shapes the API ----------------------


def test_a_bad_policy_stops_the_start_with_its_line(tmp: Path) -> None:
    require_tool("terraform")
    policy = tmp / "policy.toml"
    policy.write_text('[modules.droplet.variables.size]\nenum = ["s-1vcpu-1gb", 2]\n')
    done = subprocess.run([sys.executable, "-m", "tfserver", "--policy", str(policy),
                           "--modules-dir", str(ROOT / "modules"), "--port", "0",
                           "--state-dir", str(tmp / "state")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp)})
    assert done.returncode == 2
    assert done.stderr == (f"tfserver: error: {policy}: modules.droplet.variables.size.enum[1]: "
                           "is not a value of type string\n")
    policy.write_text("[defaults]\nmax_runs_per_tenant = 2\n[modules.droplet\n")
    done = subprocess.run([sys.executable, "-m", "tfserver"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp),
                               "TFSERVER_POLICY": str(policy), "TFSERVER_PORT": "0",
                               "TFSERVER_STATE_DIR": str(tmp / "state")})
    assert done.returncode == 2
    assert re.fullmatch(rf"tfserver: error: {re.escape(str(policy))}: not valid TOML: .*"
                        r"\(at line 3, column \d+\)\n", done.stderr), done.stderr


def test_the_server_publishes_and_enforces_the_policy(tmp: Path) -> None:
    """GET /{module} shows the narrowed schema; a refused value is 400 with no terraform
    process (the shim's log does not grow)."""
    require_tool("terraform")
    root = tmp / "modules"
    (root / "shop").mkdir(parents=True)
    (root / "shop" / "main.tf").write_text(SHOP)
    policy = tmp / "policy.toml"
    policy.write_text(NARROW)
    shim, calls = terraform_shim(tmp)
    server = start_server(tmp, modules_dir=root,
                          env={"TFSERVER_POLICY": str(policy), "TFSERVER_TERRAFORM": str(shim)})
    try:
        r = server.request("GET", "/shop")
        assert r.status == 200, r.body
        variables = r.json["variables"]
        assert variables["properties"]["size"]["enum"] == ["small", "medium"]
        assert "tfserver_tenant" not in variables["properties"]
        before = calls.read_text()
        r = server.request("POST", "/shop", {"size": "huge-Q7", "tfserver_tenant": "x"})
        assert r.status == 400
        assert r.json["errors"] == [
            {"field": "size", "message": "must be one of small, medium"},
            {"field": "tfserver_tenant", "message": "is set by the server"}]
        assert "Q7" not in r.body.decode()
        assert calls.read_text() == before
    finally:
        assert server.stop() == 0


def test_the_docs_example_policy_loads(tmp: Path) -> None:
    page = (ROOT / "docs" / "governance.md").read_text()
    section = page[page.index("# Governance: the policy file"):]
    example = re.search(r"```toml\n(.*?)```", section, re.S)
    assert example is not None
    served = discover(ROOT / "modules")
    policy = load(tmp, example.group(1), served)
    assert policy.limits("droplet", "6v3k2ds0q7vbr4qhcmi8f1a2b3") == Limits(10, 4, DAY, 7 * DAY)
    assert policy.limits("droplet", None) == Limits(3, 2, DAY, 7 * DAY)
