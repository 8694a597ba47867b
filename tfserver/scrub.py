"""Scrubbing: every value of a sensitive variable removed from text meant for a client or
a log, in every form terraform or a provider may print it."""

from __future__ import annotations

import json
from collections.abc import Iterable

SCRUBBED = "(sensitive value)"


class Scrubber:
    """Removes every sensitive value from text meant for a client or a log."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for s in secrets:
            forms.add(s)
            forms.add(json.dumps(s)[1:-1])  # as it appears inside a JSON or HCL string
        self.forms = sorted((f for f in forms if f), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self.forms:
            text = text.replace(form, SCRUBBED)
        return text
