"""The CPU the server's own threads may run on (TFSERVER_PIN_CPU), and every CPU for
terraform and the threads of runs.

Why pin: the server is one Python process, where one thread at a time runs Python (the
GIL). Each system call a thread makes (a socket read, a `stat`) hands the GIL to another
busy thread; on a machine of several CPUs that thread often sleeps on another CPU, and
waking it there (an interrupt between processors, slow under a hypervisor) leaves the GIL
unused meanwhile. With the server's threads on one CPU a handoff is a switch on that CPU:
on a 2-CPU virtual machine, keep-alive GETs of an instance under 32 connections went from
about 2,200 to 4,200 a second, and new TLS connections from about 800 to 1,350 (the
handshakes' work outside the GIL gained less from a second CPU than the handoffs lost;
docs/development.md). So it is the default (`auto`, where there are several CPUs). What it
costs: work done outside the GIL no longer spreads over the other CPUs, and the server
cannot move away from other load on its CPU (the kernel moves that load instead, unless
it is pinned too).

Not pinned: terraform and its providers, processes of their own, which keep every CPU the
server may use (a child inherits the CPUs of the thread that starts it, and Go sizes its
scheduler by them, so that thread is widened to all of them while it starts one); and the
threads of runs (`anywhere`: the run's own, the record keeper, the inputs' writers), whose
work while terraform starts would otherwise queue behind terraform on the server's CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from ..errors import ConfigError

logger = logging.getLogger(__name__)

#: How often `pin` walks the threads again when the last walk found one unpinned (a
#: thread started by one not yet pinned).
PIN_PASSES = 10


class Scheduler:
    """The system calls `Affinity` makes (Linux; a test gives a fake that fails)."""

    def cpus_of(self, tid: int) -> set[int]:
        """The CPUs thread `tid` (0: the calling one) may run on."""
        return os.sched_getaffinity(tid)

    def keep(self, tid: int, cpus: set[int] | frozenset[int]) -> None:
        """Keep thread `tid` (0: the calling one) to `cpus`."""
        os.sched_setaffinity(tid, cpus)

    def threads(self) -> list[int]:
        """The ids of the process's threads."""
        return [int(tid) for tid in os.listdir("/proc/self/task")]


class Affinity:
    """Where the server's threads run (`cpu`; None: anywhere) and terraform's processes
    (`allowed`: every CPU the server was started with)."""

    def __init__(self, cpu: int | None = None, allowed: frozenset[int] = frozenset(),
                 scheduler: Scheduler | None = None, *, required: bool = True) -> None:
        self.cpu = cpu
        self.allowed = allowed
        self.scheduler = scheduler or Scheduler()
        #: A CPU asked for by number must be had; `auto` is done where it can be.
        self.required = required

    @classmethod
    def choose(cls, setting: int | str | None) -> Affinity:
        """The affinity TFSERVER_PIN_CPU asks for: None (off), `auto` (the CPU the server
        starts on, where threads can be kept to one and there are several) or a CPU's
        number. ConfigError when a CPU asked for by number cannot be had."""
        if setting is None:
            return cls()
        if not hasattr(os, "sched_setaffinity"):
            if setting == "auto":
                return cls()
            raise ConfigError("TFSERVER_PIN_CPU: this system cannot keep threads to a CPU "
                              "(Linux only); leave it off")
        try:
            allowed = frozenset(os.sched_getaffinity(0))
        except OSError as e:  # a sandbox that refuses it
            if setting == "auto":
                logger.warning("TFSERVER_PIN_CPU=auto: cannot read this server's CPUs (%s); "
                               "its threads run on every CPU", e.strerror or e)
                return cls()
            raise ConfigError(f"TFSERVER_PIN_CPU: cannot read this server's CPUs: "
                              f"{e.strerror or e}") from e
        if setting == "auto":
            # On one CPU there is nothing to keep to.
            return cls(_current_cpu(allowed), allowed, required=False) \
                if len(allowed) > 1 else cls()
        cpu = int(setting)
        if cpu not in allowed:
            raise ConfigError(f"TFSERVER_PIN_CPU: CPU {cpu} is not one this server may run "
                              f"on ({', '.join(map(str, sorted(allowed)))})")
        return cls(cpu, allowed)

    def pin(self) -> None:
        """Every thread of the server onto its CPU; threads started later inherit it.
        When the threads cannot be listed or moved: ConfigError for a CPU asked for by
        number; for `auto`, a warning, and the threads are left on every CPU."""
        if self.cpu is None:
            return
        try:
            self._pin({self.cpu})
            logger.info("the server's threads keep to CPU %d (TFSERVER_PIN_CPU; threads of "
                        "runs and terraform use CPUs %s)", self.cpu,
                        ",".join(map(str, sorted(self.allowed))))
        except ConfigError as e:
            if self.required:
                raise
            logger.warning("%s; its threads run on every CPU", e)
            with contextlib.suppress(ConfigError):
                self._pin(set(self.allowed))
            self.cpu = None

    def _pin(self, only: set[int]) -> None:
        sched = self.scheduler
        try:
            sched.keep(0, only)  # the calling thread first: what it starts inherits it
            for _ in range(PIN_PASSES):
                # A thread started meanwhile by one not yet pinned shows in the next walk.
                moved = 0
                for tid in sched.threads():
                    with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                        if sched.cpus_of(tid) != only:
                            sched.keep(tid, only)
                            moved += 1
                if not moved:
                    return
        except OSError as e:
            raise ConfigError(f"TFSERVER_PIN_CPU: cannot keep the server's threads to CPU "
                              f"{self.cpu}: {e.strerror or e}") from e
        raise ConfigError(f"TFSERVER_PIN_CPU: threads kept starting unpinned after "
                          f"{PIN_PASSES} walks")

    def anywhere(self) -> None:
        """The calling thread onto every CPU the server may use: a thread that runs
        terraform or keeps a run's records. Its work while terraform starts (the run's
        record, its inputs, its request written) then goes to whichever CPU is free; kept
        to the server's, it queued behind terraform's own start there (about 1% on an
        apply of the benchmark). Never raises: a failure leaves the thread where it is."""
        if self.cpu is None:
            return
        try:
            self.scheduler.keep(0, self.allowed)
        except OSError as e:
            logger.warning("cannot let a run's thread use every CPU: %s", e.strerror or e)

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        """While the calling thread starts a process: every CPU the server may use.

        Raises nothing of its own: a process started is tracked by its caller, so a
        failure to widen or to narrow back is logged, not thrown over it (the thread
        keeps what it got)."""
        if self.cpu is None:
            yield
            return
        sched, before, widened = self.scheduler, set(self.allowed), False
        try:
            before = sched.cpus_of(0)
            if before != self.allowed:  # not already a run's thread (`anywhere`)
                sched.keep(0, self.allowed)
                widened = True
        except OSError as e:
            logger.warning("cannot give terraform every CPU: %s", e.strerror or e)
        try:
            yield
        finally:
            if widened:
                try:
                    sched.keep(0, before)
                except OSError as e:
                    logger.warning("cannot keep this thread to CPU %d again: %s", self.cpu,
                                   e.strerror or e)


def _current_cpu(allowed: frozenset[int]) -> int:
    """The CPU the calling thread is on (field 39 of its `stat`), else the lowest allowed."""
    try:
        with open("/proc/thread-self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[36])
    except (OSError, IndexError, ValueError):
        return min(allowed)
