"""References between instances, as text: `{"$ref": "/<module>/<instance>#/outputs/<name>"}`.

A JSON Reference (an object whose only key is `$ref`) to another instance's document; the
fragment is a JSON Pointer (RFC 6901: `~1` is `/`, `~0` is `~`) under `/outputs`, and may go
deeper into the output's value (`#/outputs/subnets/0/id`). Pure: no I/O, no names looked
up; `app/references.py` checks and resolves what this parses.

The document part is exactly `/<module>/<instance>` with the API's names: nothing
percent-encoded, no `..`, no query, no other route (`/runs/...`, `/docs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..names import NAME_RE

#: The longest `$ref` text read (longer: refused before it is parsed).
MAX_REF_LENGTH = 1024
#: The most pointer tokens after `/outputs` (the output's name and the path into it).
MAX_POINTER_TOKENS = 32


class RefSyntaxError(ValueError):
    """A `$ref` that is not a reference this server reads (the message says why)."""


@dataclass(frozen=True)
class Ref:
    """One parsed reference: the instance, the output, and the path into its value."""

    module: str
    instance: str
    output: str
    path: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """`module/instance`, as messages name the instance."""
        return f"{self.module}/{self.instance}"


def is_reference(value: Any) -> bool:
    """True for an object whose only key is `$ref`."""
    return isinstance(value, dict) and len(value) == 1 and "$ref" in value


def parse_ref(text: Any) -> Ref:
    """The reference a `$ref` value names; `RefSyntaxError` saying what is wrong."""
    if not isinstance(text, str):
        raise RefSyntaxError("$ref must be a string")
    if len(text) > MAX_REF_LENGTH:
        raise RefSyntaxError(f"$ref is longer than {MAX_REF_LENGTH} characters")
    document, hash_sign, fragment = text.partition("#")
    if not hash_sign:
        raise RefSyntaxError("$ref must be /<module>/<instance>#/outputs/<name>")
    parts = document.split("/")
    if len(parts) != 3 or parts[0] != "" or not all(NAME_RE.fullmatch(p) for p in parts[1:]):
        raise RefSyntaxError("$ref must name an instance as /<module>/<instance> "
                             "(lowercase names, nothing encoded)")
    tokens = pointer_tokens(fragment)
    if len(tokens) < 2 or tokens[0] != "outputs" or tokens[1] == "":
        raise RefSyntaxError("the fragment of $ref must be /outputs/<name>[/...]")
    if len(tokens) - 1 > MAX_POINTER_TOKENS:
        raise RefSyntaxError(f"the pointer of $ref is deeper than {MAX_POINTER_TOKENS}")
    return Ref(parts[1], parts[2], tokens[1], tuple(tokens[2:]))


def pointer_tokens(pointer: str) -> list[str]:
    """The reference tokens of a JSON Pointer (RFC 6901), unescaped."""
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise RefSyntaxError("the fragment of $ref must be a JSON Pointer (start with /)")
    tokens = []
    for raw in pointer[1:].split("/"):
        if raw.replace("~0", "").replace("~1", "").count("~"):
            raise RefSyntaxError("a JSON Pointer escapes ~ only as ~0 and / only as ~1")
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tokens


def escape_token(token: str) -> str:
    """A pointer token written back (`~` as `~0`, `/` as `~1`)."""
    return token.replace("~", "~0").replace("/", "~1")


def ref_text(ref: Ref) -> str:
    """The `$ref` text of a parsed reference."""
    pointer = "".join("/" + escape_token(t) for t in ("outputs", ref.output, *ref.path))
    return f"/{ref.module}/{ref.instance}#{pointer}"


_MISSING = object()


def follow(value: Any, path: tuple[str, ...]) -> Any:
    """The part of `value` the tokens point at; `KeyError` naming the first token that
    points at nothing (an array index is digits without a leading zero, never `-`)."""
    here = value
    for token in path:
        if isinstance(here, dict):
            here = here.get(token, _MISSING)
        elif isinstance(here, list) and _index(token) < len(here):
            here = here[_index(token)]
        else:
            here = _MISSING
        if here is _MISSING:
            raise KeyError(token)
    return here


def _index(token: str) -> int:
    """An array index token's value (RFC 6901: ASCII digits, no leading zero); a token
    that is none is past every array's end."""
    if token.isascii() and token.isdigit() and (len(token) == 1 or token[0] != "0"):
        return int(token)
    return 1 << 62
