"""Scrubbing: every value of a sensitive variable removed from text meant for a client or
a log, in every form terraform or a provider may print it.

Terraform 1.11 was run to learn the forms (see tests/test_scrub.py, which checks them
against a real run):

- Strings come back Go-quoted (`strconv.Quote`, `%q`): `"` and `\\` escaped, `\\n \\t \\r`,
  other control characters as `\\x01`, `\\x7f`, unprintable runes as `\\u00ad` or
  `\\U000e0001`, printable non-ASCII kept (`Qx\\"ZyéSecret`). The var file tfserver
  writes is echoed in `snippet.code` in Python's ASCII JSON (`\\u00e9`), and the `-json`
  event stream wraps all of these in Go's JSON once more (`<>&` as `\\u003c\\u003e\\u0026`).
  The plan renderer prints a string of several lines as a heredoc, one raw line each
  (a PEM key): so each line of six characters or more is a form of its own.
- Numbers come back in canonical decimal form (big.Float `Text('f', -1)`: `1e2` as `100`,
  `1.5e-7` as `0.00000015`), and in `snippet.values` rounded to ten significant digits
  (`Text('g', 10)`: `1.5e-07`, `1.23456789e+22`). Providers see float64s and print them
  with Go's `%v`/`%g`/`%e` or JSON; Python prints the var file with `repr`.

`renderings` produces all of these for one leaf value; `Scrubber` replaces every
occurrence, overlapping ones included, with `SCRUBBED`. Booleans are never passed in: "true"
reveals next to nothing, and scrubbing it would maim every text.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from decimal import ROUND_HALF_DOWN, ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, localcontext
from types import MappingProxyType
from typing import Any

SCRUBBED = "(sensitive value)"
#: What a sensitive output reads as, wherever outputs are shown to a non-admin.
REDACTED = "<sensitive>"

Secret = str | int | float
"""One leaf of a sensitive value, as the request body or a default gave it."""

# Characters Go's strconv.Quote leaves alone without asking whether they are printable.
_GO_QUOTE_SPECIAL = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')
_GO_QUOTE_SHORT = MappingProxyType({
    '"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n",
    "\r": "\\r", "\t": "\\t", "\v": "\\v",
})
# Characters Go's encoding/json escapes (HTML-safe by default, as terraform's -json output).
_GO_JSON_SPECIAL = re.compile(r'[\x00-\x1f"\\<>&\u2028\u2029\ud800-\udfff]')
_GO_JSON_HTML = frozenset("<>&")
_JSON_SHORT = MappingProxyType({
    '"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f",
})
_JSON_TOKEN = re.compile(r"\\(?:u[0-9a-f]{4}|.)", re.DOTALL)
# What terraform (cty) accepts when it converts a string to a number.
_DECIMAL_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TIE_MODES = (ROUND_HALF_EVEN, ROUND_HALF_UP, ROUND_HALF_DOWN)
# Significant digits printers round to: terraform's snippet values (10), C's and Python's
# %g (6), %e in C, Go and Python (7: one before the point, six after).
_ROUNDINGS = (10, 6, 7)
# Beyond this a positional form would be thousands of characters; terraform never gets
# such a number from a request (see jsonbody.MAX_EXPONENT), only from an odd default.
_MAX_POSITIONAL = 1000


def shown_outputs(outputs: Mapping[str, Mapping[str, Any]], *, reveal: bool = False,
                  scrub: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Terraform's outputs (name → {"value", "sensitive"}, as the state and the `-json`
    stream hold them) as the API shows them: a sensitive one reads `REDACTED`, unless
    `reveal` (an admin asks) and its value is there (the stream never carries it); the
    others pass `scrub` (an output equal to a secret is no less secret for being shown)."""
    shown: dict[str, Any] = {}
    for name, out in outputs.items():
        if not out.get("sensitive"):
            value = out.get("value")
            shown[name] = value if scrub is None else scrubbed(value, scrub)
        else:
            shown[name] = out.get("value") if reveal and "value" in out else REDACTED
    return shown


def scrubbed(value: Any, scrub: Callable[[str], str]) -> Any:
    """A JSON value with every string in it, a map's keys too, passed through `scrub`."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(str(k)): scrubbed(v, scrub) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrubbed(v, scrub) for v in value]
    return value


def renderings(secret: Secret) -> frozenset[str]:
    """Every text form in which terraform, a provider or tfserver may print one value."""
    if isinstance(secret, bool):
        return frozenset()
    if isinstance(secret, int | float):
        return frozenset(_number_forms(secret))
    forms = _string_forms(secret)
    if len(secret) <= 400 and _DECIMAL_TEXT.fullmatch(secret):
        # Terraform turns "7.50" into 7.5 for a number-typed variable, and prints that.
        forms |= _decimal_forms(Decimal(secret))
    return frozenset(f for f in forms if f)


class Scrubber:
    """Removes every sensitive value from text meant for a client or a log.

    One regular expression holds every form of every secret, as a trie so that the
    engine tests a position against a few branches, not against every form (2 KB with ten
    secrets: about 30 µs against 125 µs for a flat alternation). Where forms of two
    secrets overlap (`abcd` and `cdef` in `abcdef`), the whole overlapping stretch is
    scrubbed: a plain leftmost match would leave the other secret's tail in clear.
    """

    def __init__(self, secrets: Iterable[Secret]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            forms |= renderings(secret)
        self.forms: tuple[str, ...] = tuple(sorted(forms, key=lambda f: (-len(f), f)))
        self._pattern = _compile(self.forms) if self.forms else None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        match = self._pattern.search(text)
        if match is None:
            return text
        pieces: list[str] = []
        done = 0
        while match is not None:
            start, end = match.span()
            match = self._pattern.search(text, start + 1)
            while match is not None and match.start() < end:
                end = max(end, match.end())
                match = self._pattern.search(text, match.start() + 1)
            pieces += (text[done:start], SCRUBBED)
            done = end
        pieces.append(text[done:])
        return "".join(pieces)


# Deeper tries would strain the regex compiler's recursion; a flat alternation is slower
# but has no depth (it needs forms that nest inside one another over a hundred times).
_MAX_TRIE_NESTING = 100


def _compile(forms: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern matching the longest form at a position, built from the forms' trie."""
    trie: dict[str, dict[str, Any]] = {}
    for form in forms:
        node = trie
        for char in form:
            node = node.setdefault(char, {})
        node[""] = {}  # a form ends here
    if _nesting(trie) > _MAX_TRIE_NESTING:
        return re.compile("|".join(map(re.escape, sorted(forms, key=len, reverse=True))))
    return re.compile(_trie_pattern(trie))


def _nesting(trie: dict[str, Any]) -> int:
    deepest, stack = 0, [(trie, 0)]
    while stack:
        node, depth = stack.pop()
        if len(node) > 1:  # a choice: a group in the pattern
            depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for key, child in node.items() if key)
    return deepest


def _trie_pattern(node: dict[str, Any]) -> str:
    branches = []
    for char in sorted(k for k in node if k):
        child, literal = node[char], re.escape(char)
        while len(child) == 1 and "" not in child:  # a run without choices: one literal
            (char, child), = child.items()
            literal += re.escape(char)
        branches.append(literal + _trie_pattern(child))
    if not branches:
        return ""
    if "" in node:  # greedy: longer forms through this node before the one ending here
        return f"(?:{'|'.join(branches)})?"
    return branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"


# -- strings -----------------------------------------------------------------------------

# Shorter lines of a multi-line secret ("-----", "}", "") are everywhere in text.
_MIN_LINE = 6


def _string_forms(text: str) -> set[str]:
    quoted = {_go_quote(text, unassigned_printable=False),
              _go_quote(text, unassigned_printable=True)}
    lines = {line.strip() for line in text.split("\n")} if "\n" in text else set()
    once = {text, *quoted, *(encode(text) for encode in _JSON_ENCODERS),
            *(line for line in lines if len(line) >= _MIN_LINE)}
    # A JSON line that carries a diagnostic (terraform -json) or a var-file line
    # (snippet.code) escapes each of those once more.
    return once | {encode(form) for form in once for encode in _JSON_ENCODERS}


def _go_quote(text: str, *, unassigned_printable: bool) -> str:
    """Go's strconv.Quote without the quotes, as terraform's `%q` prints a string.

    Go judges printability by its own Unicode tables, which may be newer than Python's:
    a character Python does not know yet is printable to Go if it is a letter or symbol
    there, so both readings are produced.
    """
    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if char in _GO_QUOTE_SHORT:
            return _GO_QUOTE_SHORT[char]
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            return "\ufffd"  # Go never holds a lone surrogate: JSON decoding made it U+FFFD
        if char.isprintable() or (unassigned_printable and unicodedata.category(char) == "Cn"):
            return char
        if code < 0x80:
            return f"\\x{code:02x}"
        return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"

    return _GO_QUOTE_SPECIAL.sub(escape, text)


def _python_json(text: str, *, ascii_only: bool, upper_hex: bool = False) -> str:
    inner = json.dumps(text, ensure_ascii=ascii_only)[1:-1]
    if upper_hex:
        inner = _JSON_TOKEN.sub(lambda m: m.group().upper() if m.group()[1] == "u"
                                else m.group(), inner)
    return inner


def _go_json(text: str, *, html: bool, short_bf: bool) -> str:
    """Go's encoding/json without the quotes (Go 1.22+ writes \\b and \\f short)."""
    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if char in _GO_JSON_HTML and not html:
            return char
        if char in _JSON_SHORT and (short_bf or char not in "\b\f"):
            return _JSON_SHORT[char]
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            return "\ufffd"
        return f"\\u{code:04x}"

    return _GO_JSON_SPECIAL.sub(escape, text)


_JSON_ENCODERS: tuple[Callable[[str], str], ...] = (
    lambda t: _python_json(t, ascii_only=True),
    lambda t: _python_json(t, ascii_only=True, upper_hex=True),
    lambda t: _python_json(t, ascii_only=False),
    lambda t: _go_json(t, html=True, short_bf=True),
    lambda t: _go_json(t, html=True, short_bf=False),
    lambda t: _go_json(t, html=False, short_bf=True),
)


# -- numbers -----------------------------------------------------------------------------

def _number_forms(value: int | float) -> set[str]:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return {repr(value)}
    if isinstance(value, int):
        return _decimal_forms(Decimal(value))
    # tfserver writes a float with repr (the shortest digits that read back the same),
    # so those digits are the exact number terraform holds.
    forms = _decimal_forms(Decimal(repr(value))) | {repr(value)}
    if value == 0:
        forms |= _decimal_forms(Decimal(0))  # terraform has no negative zero: -0.0 is 0
    return forms


def _decimal_forms(exact: Decimal) -> set[str]:
    """The forms of one exact decimal number, its float64 and its usual roundings."""
    if not exact.is_finite():
        return set()
    values = {exact}
    try:
        as_float = float(exact)
    except OverflowError:
        as_float = float("inf")
    if as_float not in (float("inf"), float("-inf")):
        values.add(Decimal(repr(as_float)))  # what a provider holds as a float64
        forms = {repr(as_float)}
    else:
        forms = set()
    for value in tuple(values):
        for digits in _ROUNDINGS:
            for mode in _TIE_MODES:
                # Terraform rounds its 512-bit binary value, whose ties can fall either way.
                values.add(_round(value, digits, mode))
    for value in values:
        forms |= _notations(value)
    return forms


def _round(value: Decimal, digits: int, mode: str) -> Decimal:
    if not value:
        return value
    with localcontext() as ctx:
        ctx.prec, ctx.rounding = digits, mode
        return +value


def _notations(value: Decimal) -> set[str]:
    """Positional and scientific notations of a decimal, as the printers write them."""
    sign_bit, digit_tuple, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # NaN or infinity: no number to print
        return set()
    digits = "".join(map(str, digit_tuple)).lstrip("0")
    sign = "-" if sign_bit else ""
    if digits:
        exponent += len(digits) - len(digits.rstrip("0"))
        digits = digits.rstrip("0")
    else:
        digits, exponent = "0", 0
    magnitude = exponent + len(digits) - 1  # the exponent of d.ddd x 10^e
    forms: set[str] = set()
    if abs(magnitude) <= _MAX_POSITIONAL:
        if exponent >= 0:
            positional = digits + "0" * exponent
        elif magnitude >= 0:
            positional = f"{digits[:magnitude + 1]}.{digits[magnitude + 1:]}"
        else:
            positional = "0." + "0" * (-magnitude - 1) + digits
        forms.add(sign + positional)
    mantissas = {digits[0] + ("." + digits[1:] if len(digits) > 1 else "")}
    if len(digits) <= 7:
        mantissas.add(digits[0] + "." + digits[1:].ljust(6, "0"))  # %e pads to six places
    exponent_texts = {f"{'-' if magnitude < 0 else plus}{abs(magnitude):0{width}d}"
                      for plus in ("+", "") for width in (1, 2)}
    for mantissa in mantissas:
        for e in ("e", "E"):
            forms |= {f"{sign}{mantissa}{e}{text}" for text in exponent_texts}
    return forms
