"""The destroy of an expired instance, as the reaper asks for it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

from ..auth import Principal
from ..module.discover import Module
from ..names import split_workspace
from ..runs.expiry import Due
from ..scrub import Scrubber
from .execute import RunSpec

#: Who destroys expired instances (an admin of no tenant), as records and audit lines say.
REAPER = Principal(subject="tfserver:ttl", tenant="tfserver:ttl", admin=True)


def expired_destroy(modules: Mapping[str, Module], due: Due,
                    busy: Callable[[Hashable], bool]) -> RunSpec | None:
    """The destroy of an expired instance as a run of `tfserver:ttl`; None when it is not
    an instance of a module served here, or is being changed here now (the reaper tries
    again later)."""
    module = modules.get(due.module)
    parts = split_workspace(due.workspace)
    if module is None or parts is None or busy((due.module, due.workspace)):
        return None
    return RunSpec(module, parts[1], due.workspace, "destroy", {}, REAPER,
                   Scrubber(module.secret_values({})), expiry=due.expires_at)
