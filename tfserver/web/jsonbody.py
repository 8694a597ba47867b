"""Request bodies: bytes to JSON values within limits checked before anything recurses.

`json.loads` alone recurses once per level of nesting (10,000 levels: RecursionError, a
500), reads any count of values (500,000 list items: a minute of terraform), and takes
numbers terraform would print back in a form Python cannot read (4,301 digits) or that
are not numbers at all once written out (`1e400` becomes `Infinity`). So the body is first
measured with string methods that run in C and do not recurse: strings blanked out,
brackets and commas counted, depth taken as the running sum of brackets.
Only a body within every limit reaches `json.loads`. A body that may break a limit is
walked once more, token by token, to name the field at fault.

Errors name only the top-level field (a variable): the path below it runs through the
value's own map keys, which may be secret, and no error repeats a value.

Number bounds: at most `MAX_DIGITS` (100) significant digits and a magnitude within
1e-`MAX_EXPONENT`..1e+`MAX_EXPONENT` (300). Terraform holds numbers as 512-bit floats
(about 154 decimal digits), so every accepted number is carried exactly and printed back
with the same digits; its plain decimal form is at most about 400 characters, far under
Python's 4,300-digit limit for reading integers, and within float range (1e-300 is
still a normal float, 1e300 is finite) so the event stream and state stay readable.
"""

from __future__ import annotations

import json
import re
import unicodedata
from itertools import accumulate
from types import MappingProxyType
from typing import Any

from ..errors import BadRequest, FieldError, InvalidInput

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects, the body's own object included (TFSERVER_MAX_DEPTH)."""
MAX_VALUES = 100_000
"""Most values in a body: every object, array, member, item and scalar."""
MAX_DIGITS = 100
"""Most significant digits in a number."""
MAX_EXPONENT = 300
"""Largest decimal exponent of a number's leading digit, either way."""

_WS = "[ \t\n\r]*"
# Possessive: an unterminated string is given up at once, not retried character by character.
_STRING = r'"(?:[^"\\]++|\\.)*+"'
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = MappingProxyType({"[": 1, "{": 1, "]": -1, "}": -1})
_LONG_NUMBER = re.compile(r"[\d.]{" + str(MAX_DIGITS + 1) + "}")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN = re.compile(
    _WS + "(?:(?P<string>" + _STRING + r")|(?P<open>[\[{])|(?P<close>[\]}])"
    r'|(?P<colon>:)|(?P<comma>,)|(?P<atom>[^ \t\n\r"\[\]{},:]+)|(?P<other>.))',
    re.DOTALL,
)
_NUMBER = re.compile(r"-?(?P<int>0|[1-9]\d*)(?:\.(?P<frac>\d+))?(?:[eE](?P<exp>[+-]?\d+))?")
_FIELD_SHOWN = 64


def parse_body(data: bytes, *, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> Any:
    """The JSON value of a request body, or `BadRequest` (`InvalidInput` when a field is
    at fault): not UTF-8, not JSON, NaN or Infinity, too deep, too many values, or a number
    beyond `MAX_DIGITS` / `MAX_EXPONENT`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8") from None
    bare = "".join(_blank_strings(text).split())
    openings = bare.count("[") + bare.count("{")
    values = bare.count(",") + openings - bare.count("[]") - bare.count("{}") + 1
    if values > max_values:
        raise BadRequest(f"the body holds more than {max_values} values "
                         "(objects, arrays, their members and items)")
    too_deep = openings > max_depth and max(
        accumulate(map(_STEP.__getitem__, _NOT_BRACKET.sub("", bare))), default=0) > max_depth
    # Outside strings, valid JSON has letters only in true, false, null and exponents:
    # so an "e" beyond those of true and false, an "E", "N" or "I" (NaN, Infinity) or a
    # long run of digits is worth a closer look.
    suspect_number = ("E" in bare or "N" in bare or "I" in bare
                      or bare.count("e") > bare.count("true") + bare.count("false")
                      or _LONG_NUMBER.search(bare) is not None)
    if too_deep or suspect_number or ("\\u" in text and _SURROGATE_ESCAPE.search(text)):
        _find_fault(text, max_depth)
        if too_deep:  # the walk agrees with the count; this is only a safety net
            raise BadRequest(f"the body nests deeper than {max_depth} levels")
    try:
        # Only non-ASCII keys (sent as such or \u-escaped) can clash once normalized.
        plain = text.isascii() and "\\u" not in text
        return json.loads(text, parse_constant=_no_constant,
                          object_pairs_hook=None if plain else _nfc_distinct)
    except RecursionError:  # cannot happen within max_depth; never let it be a 500
        raise BadRequest(f"the body nests deeper than {max_depth} levels") from None
    except ValueError as e:
        raise BadRequest(f"the body is not valid JSON: {_reason(e)}") from None


def _blank_strings(text: str) -> str:
    """The text with every string emptied to `""`, so brackets and commas in strings
    are not counted. Escaped backslashes go first, then escaped quotes: what is left of a
    backslash run pairs with the character after it, as in a JSON string."""
    if "\\" in text:
        text = text.replace("\\\\", "").replace('\\"', "")
    return '""'.join(text.split('"')[::2])


def _find_fault(text: str, max_depth: int) -> None:
    """Walk the tokens of a body that may break a limit; raise for the first fault found,
    naming the top-level field it sits in. Malformed JSON is left to `json.loads`."""
    kinds: list[str] = []  # "[" or "{" for each open container
    field = ""
    expect_name = False
    index = 0
    pos = 0
    while pos < len(text):
        token = _TOKEN.match(text, pos)
        if token is None:  # only trailing whitespace is left
            break
        pos = token.end()
        kind = token.lastgroup or ""
        value = token.group(kind) if kind else ""
        if kind == "open":
            if len(kinds) >= max_depth:
                raise _fault(field, f"nests deeper than {max_depth} levels of arrays and objects")
            kinds.append(value)
            if len(kinds) == 1:
                expect_name, index = value == "{", 0
                field = "[0]" if value == "[" else ""
        elif kind == "close":
            if kinds:
                kinds.pop()
        elif kind == "comma" and len(kinds) == 1:
            index += 1
            if kinds[0] == "{":
                expect_name = True
            else:
                field = f"[{index}]"
        elif kind == "string":
            is_name = len(kinds) == 1 and kinds[0] == "{" and expect_name
            if "\\u" in value and _has_lone_surrogate(value):
                raise _fault("" if is_name else field,
                             "holds a \\uD800-\\uDFFF escape that is not part of a pair")
            if is_name:
                field, expect_name = _name(value), False
        elif kind == "atom":
            problem = _number_problem(value)
            if problem:
                raise _fault(field, problem)


def _number_problem(atom: str) -> str | None:
    """Why a bare token is an unacceptable number; None if it is fine or not a number."""
    if atom in ("NaN", "Infinity", "-Infinity"):
        return "is not a finite number (NaN and Infinity are not JSON)"
    number = _NUMBER.fullmatch(atom)
    if number is None:
        return None  # true, false, null, or junk that json.loads will report
    whole, fraction = number["int"].lstrip("0"), number["frac"] or ""
    digits = (whole + fraction).lstrip("0")
    if not digits:
        return None  # zero, whatever its exponent
    if len(digits.rstrip("0")) > MAX_DIGITS:
        return f"is a number with more than {MAX_DIGITS} significant digits"
    exponent_text = (number["exp"] or "0").lstrip("+")
    exponent_digits = exponent_text.lstrip("-").lstrip("0") or "0"
    if len(exponent_digits) > 9:  # past what the zeros of a fraction in 1 MiB make up for
        return _OUT_OF_RANGE
    exponent = int(exponent_digits) * (-1 if exponent_text.startswith("-") else 1)
    if whole:
        magnitude = exponent + len(whole) - 1
    else:
        magnitude = exponent - (len(fraction) - len(fraction.lstrip("0"))) - 1
    return _OUT_OF_RANGE if abs(magnitude) > MAX_EXPONENT else None


_OUT_OF_RANGE = (f"is a number out of range (zero, or from 1e-{MAX_EXPONENT} "
                 f"to 1e+{MAX_EXPONENT} in size)")


def _has_lone_surrogate(token: str) -> bool:
    # Terraform would read a lone surrogate as U+FFFD: a value nobody sent.
    try:
        decoded = json.loads(token)
    except ValueError:
        return False  # a bad escape: json.loads reports it
    return isinstance(decoded, str) and _LONE_SURROGATE.search(decoded) is not None


def _name(token: str) -> str:
    try:
        name = str(json.loads(token))
    except ValueError:
        return ""
    return name if len(name) <= _FIELD_SHOWN else name[:_FIELD_SHOWN] + "…"


def _fault(field: str, message: str) -> InvalidInput:
    where = f"field {field}" if field else "the body"
    return InvalidInput(f"{where} {message}", [FieldError(field, message)])


def _nfc_distinct(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of the body, unless two of its keys are one once Unicode-normalized:
    terraform normalizes strings (NFC) and refuses such an object as a duplicate, which
    no schema can say in advance."""
    found = dict(pairs)
    if len({unicodedata.normalize("NFC", key) for key in found}) != len(found):
        raise _fault("", "holds an object with two keys that are the same once "
                         "Unicode-normalized (NFC)")
    return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _reason(error: ValueError) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno} column {error.colno}"
    return str(error)[:100]
