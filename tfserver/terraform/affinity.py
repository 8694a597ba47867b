"""The CPU the server's own threads may run on (TFSERVER_PIN_CPU), and every CPU for
terraform.

Why pin: the server is one Python process, where one thread at a time runs Python (the
GIL). Each system call a thread makes (a socket read, a `stat`) hands the GIL to another
busy thread; on a machine of several CPUs that thread often sleeps on another CPU, and
waking it there (an interrupt between processors, slow under a hypervisor) leaves the GIL
unused meanwhile. With the server's threads on one CPU a handoff is a switch on that CPU:
on a 2-CPU virtual machine, keep-alive GETs of an instance under 32 connections went from
about 1,900 to 3,700 a second (docs/development.md). What it costs: work done outside the
GIL (TLS handshakes, the kernel's side of file and socket calls) no longer spreads over
the other CPUs, and the pinned CPU's other load is not moved away from.

Terraform and its providers are processes of their own and keep every CPU the server
may use: a child inherits the CPUs of the thread that starts it (and Go sizes its
scheduler by them), so that thread is widened to all of them while it starts one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ..errors import ConfigError


class Affinity:
    """Where the server's threads run (`cpu`; None: anywhere) and terraform's processes
    (`allowed`: every CPU the server was started with)."""

    def __init__(self, cpu: int | None = None, allowed: frozenset[int] = frozenset()) -> None:
        self.cpu = cpu
        self.allowed = allowed

    @classmethod
    def choose(cls, setting: int | str | None) -> Affinity:
        """The affinity TFSERVER_PIN_CPU asks for: None (off), `auto` (the CPU the server
        starts on) or a CPU's number. ConfigError when it cannot be had."""
        if setting is None:
            return cls()
        if not hasattr(os, "sched_setaffinity"):
            raise ConfigError("TFSERVER_PIN_CPU: this system cannot keep threads to a CPU "
                              "(Linux only); leave it off")
        allowed = frozenset(os.sched_getaffinity(0))
        cpu = _current_cpu(allowed) if setting == "auto" else int(setting)
        if cpu not in allowed:
            raise ConfigError(f"TFSERVER_PIN_CPU: CPU {cpu} is not one this server may run "
                              f"on ({', '.join(map(str, sorted(allowed)))})")
        return cls(cpu, allowed)

    def pin(self) -> None:
        """Every thread of the server onto its CPU; threads started later inherit it."""
        if self.cpu is None:
            return
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(tid), {self.cpu})

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        """While the calling thread starts a process: every CPU the server may use."""
        if self.cpu is None:
            yield
            return
        os.sched_setaffinity(0, self.allowed)
        try:
            yield
        finally:
            os.sched_setaffinity(0, {self.cpu})


def _current_cpu(allowed: frozenset[int]) -> int:
    """The CPU the calling thread is on (field 39 of its `stat`), else the lowest allowed."""
    try:
        with open("/proc/thread-self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[36])
    except (OSError, IndexError, ValueError):
        return min(allowed)
