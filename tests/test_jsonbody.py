"""Request bodies within limits (issue 15 #1 and #3): depth, value count and number bounds
are 400s naming the field, checked before json.loads recurses; nothing else ever raised."""

from __future__ import annotations

import json
import random
import time
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfserver.errors import BadRequest, InvalidInput
from tfserver.web.jsonbody import MAX_DEPTH, MAX_DIGITS, MAX_EXPONENT, MAX_VALUES, parse_body

PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def refusal(data: bytes, **limits: int) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        parse_body(data, **limits)
    return caught.value


def fields(error: BadRequest) -> list[str]:
    assert isinstance(error, InvalidInput)
    return [e.field for e in error.errors]


# -- tables -------------------------------------------------------------------------------

ACCEPTED = [
    b"{}", b"[]", b" [ ] ", b'{"a": 1}', b"null", b"0", b'"x"',
    b'{"a": "[[[[,,,\\"]]]", "b": "\\\\", "c": "x\\\\\\"y"}',  # brackets and quotes in strings
    b'{"text": "' + b"[" * 5000 + b'"}',  # brackets in a string are no nesting
    b'{"big": 1e300, "neg": -1e300, "tiny": 1e-300, "edge": 9.99e300}',
    b'{"n": ' + b"1" * MAX_DIGITS + b"}",
    b'{"n": 1' + b"0" * MAX_EXPONENT + b"}",  # 301 digits, one significant
    b'{"n": 0.' + b"0" * (MAX_EXPONENT - 1) + b"1}",  # 1e-300 written out
    b'{"z": [0, -0, 0.0, 0e999999999999, 0E-5]}',
    b'{"e": [1e2, 1E+2, 1.5e-7, 7654321e-3, -2.5e-300]}',
    b'{"s": "\\ud83d\\ude00 \\u00e9"}',  # a surrogate pair is one character
    b'{"x": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}",  # exactly the limit
]


@pytest.mark.parametrize("body", ACCEPTED)
def test_accepted_bodies_read_as_json_loads_reads_them(body: bytes) -> None:
    assert parse_body(body) == json.loads(body)


FIELD_FAULTS = [
    (b'{"a": NaN}', "a", "not a finite number"),
    (b'{"ok": 1, "a": [Infinity]}', "a", "not a finite number"),
    (b'{"a": {"b": -Infinity}}', "a", "not a finite number"),
    (b'{"n": 1e301}', "n", "out of range"),
    (b'{"n": 1e400}', "n", "out of range"),
    (b'{"n": -1e-301}', "n", "out of range"),
    (b'{"n": 1' + b"0" * (MAX_EXPONENT + 1) + b"}", "n", "out of range"),
    (b'{"n": 1e99999999999999999999}', "n", "out of range"),
    (b'{"n": ' + b"1" * (MAX_DIGITS + 1) + b"}", "n", "significant digits"),
    (b'{"n": 1.' + b"2" * MAX_DIGITS + b"e5}", "n", "significant digits"),
    (b'{"n": ' + b"9" * 4301 + b"}", "n", "significant digits"),  # int() would refuse it
    (b'{"x": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", "x", "deeper than 32"),
    (b"[" * 10_000, "[0]", "deeper than 32"),
    (b"[1, 2, " + b"{" * 40, "[2]", "deeper than 32"),
    (b'{"secret_map": {"apikey-Zq9": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}}",
     "secret_map", "deeper than 32"),
    (b'{"s": "\\ud800"}', "s", "not part of a pair"),
    (b'[1, 2, 1e999, 3]', "[2]", "out of range"),
]


@pytest.mark.parametrize(("body", "field", "words"), FIELD_FAULTS)
def test_faults_are_400s_naming_the_top_level_field(body: bytes, field: str,
                                                    words: str) -> None:
    error = refusal(body)
    assert fields(error) == [field]
    assert words in error.detail
    assert error.status == 400


def test_a_deep_path_never_shows_the_keys_of_a_map() -> None:
    error = refusal(b'{"v": {"apikey-Zq9": {"x": ' + b"[" * 40 + b"]" * 40 + b"}}}")
    assert "apikey" not in json.dumps(error.problem())


@pytest.mark.parametrize(("body", "words"), [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"a": "\xc3"}', "not UTF-8"),
    (b"", "not valid JSON"),
    (b'{"a": 1} x', "not valid JSON"),
    (b'{"password": "hunter2-Vq", }', "not valid JSON"),
    (b'{"a": 01}', "not valid JSON"),
    (b"\xef\xbb\xbf{}", "not valid JSON"),  # a byte-order mark
])
def test_unreadable_bodies_are_plain_400s_that_repeat_nothing(body: bytes, words: str) -> None:
    error = refusal(body)
    assert not isinstance(error, InvalidInput)
    assert words in error.detail
    assert "hunter2" not in error.detail


def test_the_value_count_is_exact() -> None:
    assert parse_body(b"[1,2,3,4]", max_values=5) == [1, 2, 3, 4]  # the list and 4 items
    assert "more than 5 values" in refusal(b"[1,2,3,4,5]", max_values=5).detail
    assert parse_body(b'{"a": [ ], "b": {}}', max_values=3) == {"a": [], "b": {}}
    refusal(b'{"a": [ ], "b": {}}', max_values=2)
    assert parse_body(b'["a,b,c,d,e,f"]', max_values=2) == ["a,b,c,d,e,f"]


def test_the_depth_limit_is_a_parameter() -> None:
    assert parse_body(b"[[[1]]]", max_depth=3) == [[[1]]]
    assert fields(refusal(b'{"a": [[1]]}', max_depth=2)) == ["a"]


# -- hostile sizes, and what they cost ------------------------------------------------------

def timed(data: bytes) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        parse_body(data)
    except BadRequest as e:
        return time.perf_counter() - started, type(e).__name__
    return time.perf_counter() - started, "accepted"


def test_a_nesting_bomb_is_refused_fast_and_never_recurses() -> None:
    elapsed, outcome = timed(b"[" * 10_000 + b"]" * 10_000)
    print(f"\n10,000 deep: {outcome} in {elapsed * 1e3:.2f} ms")
    assert outcome == "InvalidInput" and elapsed < 0.5  # measured ~3 ms
    elapsed, outcome = timed(b'{"a": ' + b'{"k": ' * 100_000 + b"1" + b"}" * 100_001)
    assert outcome in ("BadRequest", "InvalidInput") and elapsed < 1


def test_a_megabyte_of_list_items_is_refused_fast() -> None:
    body = b"[" + b"1," * 500_000 + b"1]"
    elapsed, outcome = timed(body)
    print(f"\n{len(body)} bytes, 500,001 items: {outcome} in {elapsed * 1e3:.1f} ms")
    assert outcome == "BadRequest" and elapsed < 1  # measured ~10-15 ms


def test_a_typical_body_costs_well_under_a_millisecond() -> None:
    body = json.dumps({
        "name": "web-frontend-01", "region": "nyc3", "size": "s-2vcpu-4gb",
        "tags": {"env": "production", "team": "platform", "owner": "alice@example.com"},
        "ports": [22, 80, 443, 8080, 8443], "replicas": 3, "ratio": 0.75, "backups": True,
        "ssh_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq3kz0Jb1n3x9Yb0V8sQm4t7 alice",
                     "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHt5Qw8Zs2d4Kf6Lp1Nm3Vb7X bob"],
        "user_data": "#!/bin/sh\napt-get update && apt-get install -y nginx\n",
        "db": {"engine": "pg", "version": "16", "nodes": 2, "password": 's3cr"et\\pässé'},
        "rules": [{"protocol": "tcp", "ports": "22", "sources": ["10.0.0.0/8"]},
                  {"protocol": "tcp", "ports": "443", "sources": ["0.0.0.0/0", "::/0"]}],
    }, indent=1).encode()
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        parse_body(body)
    ours = (time.perf_counter() - started) / rounds
    started = time.perf_counter()
    for _ in range(rounds):
        json.loads(body)
    plain = (time.perf_counter() - started) / rounds
    print(f"\n{len(body)} bytes: parse_body {ours * 1e6:.1f} µs, json.loads {plain * 1e6:.1f} µs")
    assert ours < 0.001


# -- properties ---------------------------------------------------------------------------

finite_floats = st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda f: f == 0 or 1e-300 <= abs(f) < 1e300)
json_values = st.recursive(
    st.none() | st.booleans() | finite_floats | st.text(max_size=12)
    | st.integers(min_value=-(10**MAX_DIGITS) + 1, max_value=10**MAX_DIGITS - 1),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=40)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@st.composite
def dumped(draw: st.DrawFn) -> tuple[Any, bytes]:
    value = draw(json_values.filter(lambda v: depth(v) <= MAX_DEPTH))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()),
                      indent=draw(st.sampled_from([None, 0, 2, "\t"])),
                      separators=draw(st.sampled_from([None, (",", ":"), (" , ", " : ")])))
    return value, text.encode()


@PROPERTY
@given(case=dumped())
def test_json_within_limits_reads_as_json_loads_reads_it(case: tuple[Any, bytes]) -> None:
    _, data = case
    assert parse_body(data) == json.loads(data)


def outcome_is_sound(data: bytes) -> None:
    """Only BadRequest ever; and a body accepted is what json.loads reads."""
    try:
        value = parse_body(data)
    except BadRequest:
        return
    assert value == json.loads(data)


@PROPERTY
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_raise_nothing_but_bad_request(data: bytes) -> None:
    outcome_is_sound(data)


JSONISH = '[]{}",:\\0123456789eE.-+ \n\ttrufalsenNIy\u00e9'


@PROPERTY
@given(case=dumped(), edits=st.lists(
    st.tuples(st.integers(0, 10**6), st.sampled_from(["insert", "delete", "replace"]),
              st.text(alphabet=JSONISH, min_size=1, max_size=3)), min_size=1, max_size=6))
def test_mangled_json_raises_nothing_but_bad_request(
        case: tuple[Any, bytes], edits: list[tuple[int, str, str]]) -> None:
    text = case[1].decode()
    for at, how, what in edits:
        at %= len(text) + 1
        if how == "insert":
            text = text[:at] + what + text[at:]
        elif how == "delete":
            text = text[:at] + text[at + len(what):]
        else:
            text = text[:at] + what + text[at + len(what):]
    outcome_is_sound(text.encode())


@PROPERTY
@given(kinds=st.lists(st.sampled_from("[{"), min_size=1, max_size=70),
       decoy=st.text(alphabet="[]{},\\\"", max_size=20), name=st.text(min_size=1, max_size=10))
def test_depth_is_refused_exactly_past_the_limit_naming_the_variable(
        kinds: list[str], decoy: str, name: str) -> None:
    value: Any = json.dumps(decoy)  # a string full of brackets, at the bottom
    for kind in reversed(kinds):
        value = f"[{value}]" if kind == "[" else f'{{"k": {value}}}'
    data = ('{"first": 1, ' + json.dumps(name) + ": " + value + "}").encode()
    if len(kinds) + 1 <= MAX_DEPTH:
        assert parse_body(data) == json.loads(data)
    else:
        assert fields(refusal(data)) == [name if len(name) <= 64 else name[:64] + "…"]


@st.composite
def number_texts(draw: st.DrawFn) -> str:
    sign = draw(st.sampled_from(["", "-"]))
    whole = draw(st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,130}", fullmatch=True)))
    fraction = draw(st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,330}", fullmatch=True)))
    exponent = draw(st.one_of(st.just(""), st.builds(
        "{}{}".format, st.sampled_from(["e", "E", "e+", "e-", "E-", "e0"]),
        st.integers(0, 700))))
    return sign + whole + fraction + exponent


def within_bounds(text: str) -> bool:
    number = Decimal(text)
    if not number:
        return True
    _, digit_tuple, _ = number.as_tuple()
    significant = "".join(map(str, digit_tuple)).strip("0")
    return (len(significant) <= MAX_DIGITS
            and -MAX_EXPONENT <= number.adjusted() <= MAX_EXPONENT)


@PROPERTY
@given(text=number_texts())
def test_numbers_are_refused_exactly_out_of_bounds(text: str) -> None:
    data = ('{"n": ' + text + "}").encode()
    if within_bounds(text):
        value = parse_body(data)["n"]
        assert value == json.loads(text)
        assert value not in (float("inf"), float("-inf"))
        assert isinstance(value, int) or value == 0 or abs(value) >= 1e-300
    else:
        assert fields(refusal(data)) == ["n"]


def test_every_limit_has_its_default() -> None:
    assert (MAX_DEPTH, MAX_VALUES, MAX_DIGITS, MAX_EXPONENT) == (32, 100_000, 100, 300)
    rng = random.Random(3)
    body = json.dumps([rng.random() for _ in range(MAX_VALUES - 1)]).encode()
    assert len(parse_body(body)) == MAX_VALUES - 1
    refusal(json.dumps(list(range(MAX_VALUES))).encode())
