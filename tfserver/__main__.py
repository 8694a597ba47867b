"""`python -m tfserver` / `tfserver`: build the config, wire the parts, serve until told to stop."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from . import logs
from .app.driftrun import drift_schedule
from .app.driftschedule import DriftSchedule
from .app.reap import REAPER
from .app.service import Service
from .app.statedir import prepare_state, spool_dir
from .auth import Authenticator, make_authenticator
from .config import AcmeSettings, Config, load
from .errors import ConfigError, TFServerError
from .metrics import Metrics
from .module.discover import Module, discover
from .module.policy import Policy
from .module.policyfile import load_policy
from .names import LOCAL_TENANT
from .notify.delivery import Notifier, targets_from_policy
from .notify.payloads import instance_event, instance_events
from .notify.store import Deliveries
from .notify.targets import AllowList
from .runs.store import AWAITING, RunRecord
from .storage import make_backend
from .storage.base import StateBackend
from .terraform.affinity import Affinity
from .terraform.process import Terraform
from .tls import (
    AcmeIssuer,
    Certificates,
    ChallengeServer,
    ChallengeStore,
    Renewer,
    context_from_files,
)
from .web.server import TFServer

logger = logging.getLogger("tfserver")

#: The longest integer (in digits) the server reads from terraform's output and state.
MAX_INT_DIGITS = 100_000


@dataclass
class Parts:
    """A wired server and the helpers that run beside it."""

    server: TFServer
    challenge: ChallengeServer | None = None
    renewer: Renewer | None = None
    #: The governance policy the modules were narrowed by (quotas and TTLs for the service).
    policy: Policy = field(default_factory=Policy.empty)
    #: Sends the policy's webhooks (None when it names none).
    notifier: Notifier | None = None
    #: Starts the policy's scheduled drift checks (None when it sets no `drift_check`).
    drift: DriftSchedule | None = None
    #: The CPU the server's threads keep to (TFSERVER_PIN_CPU), pinned once it is built.
    affinity: Affinity = field(default_factory=Affinity)


def build(config: Config) -> Parts:
    """Every part of a server from its config (bound, with its certificate, not serving),
    each built once with all it needs.

    Raises ConfigError (bad settings, unusable certificate files), AcmeError (no
    certificate could be obtained) or another error of the package's tree (a module that
    cannot be read); each ends the start with a message, not a traceback.
    """
    binary = shutil.which(config.terraform_bin)
    if binary is None:
        raise ConfigError(f"TFSERVER_TERRAFORM: {config.terraform_bin!r} is not an "
                          "executable terraform binary (not found on PATH)")
    modules = discover(config.modules_dir)
    policy = load_policy(config.policy, modules)
    _check_approvals(config, policy, modules)
    modules = policy.narrowed(modules)
    affinity = Affinity.choose(config.pin_cpu)
    terraform = Terraform(binary=binary, base_env=config.terraform_env,
                          cli_config_file=prepare_state(config),
                          kill_grace=config.kill_grace, memory_limit=config.run_memory,
                          spool_dir=spool_dir(config), affinity=affinity)
    backend = make_backend(config)
    metrics = Metrics()
    notifier = _notifier(config, policy, backend, metrics)
    # The threads that run terraform and keep its records use every CPU (affinity.py).
    service = Service(config, modules, terraform, backend, policy,
                      metrics=metrics,
                      on_run_ended=_webhooks(notifier) if notifier is not None else None,
                      run_thread=affinity.anywhere)
    service.prepare()
    drift = drift_schedule(config, policy, backend, service.runs, service.submitter, metrics)
    fetched = service.metrics.jwks_fetches
    authenticator = make_authenticator(
        config, on_fetch=lambda result: fetched.labels(result).inc())
    if config.acme is None:
        certificates = (Certificates(context_from_files(config.tls_cert, config.tls_key))
                        if config.tls_cert is not None and config.tls_key is not None
                        else None)
        return Parts(TFServer(config, service, authenticator, certificates), policy=policy,
                     notifier=notifier, drift=drift, affinity=affinity)
    return _with_acme(config, config.acme, service, authenticator,
                      lambda https, challenge, renewer: Parts(
                          https, challenge, renewer, policy=policy, notifier=notifier,
                          drift=drift, affinity=affinity))


def _with_acme(config: Config, acme: AcmeSettings, service: Service,
               authenticator: Authenticator,
               parts: Callable[[TFServer, ChallengeServer, Renewer], Parts]) -> Parts:
    """The challenge server, then the certificate it lets the CA issue, then the HTTPS
    server built with it and the renewer of that certificate."""
    server: TFServer | None = None

    def https_port() -> int:
        # Where plain HTTP redirects to: the HTTPS listener, once bound (below).
        return server.server_address[1] if server is not None else config.port

    store = ChallengeStore()
    challenge = ChallengeServer(config.host, acme.http_port, store, https_port=https_port,
                                domains=acme.domains)
    threading.Thread(target=challenge.serve_forever, name="acme-http", daemon=True).start()
    issuer = AcmeIssuer(acme, config.state_dir / "acme", store)
    try:
        issuer.ensure()
        certificates = Certificates(issuer.context())
        server = TFServer(config, service, authenticator, certificates)
    except BaseException:
        challenge.shutdown()
        challenge.server_close()
        raise
    return parts(server, challenge, Renewer(issuer, certificates, acme.check_interval))


def _notifier(config: Config, policy: Policy, backend: StateBackend,
              metrics: Metrics) -> Notifier | None:
    """The sender of the policy's webhooks, their secrets read now (None without any)."""
    if not policy.webhooks:
        return None
    allow = AllowList.parse(config.webhook_allow)
    return Notifier(Deliveries(backend.objects),
                    targets_from_policy(policy.webhooks, os.environ, allow),
                    replica=config.replica or socket.gethostname(),
                    retry=config.webhook_retry, allow=allow, metrics=metrics)


#: The webhook event of a run that awaits its approval.
AWAITING_EVENT = "run.awaiting_approval"


def _webhooks(notifier: Notifier) -> Callable[[RunRecord], object]:
    """What a run's end sends: `run.finished`, then the instance's events (`instance.
    drifted`, `instance.expired`, `instance.destroyed`: ids and links only, the drift's
    names stay in the API); and `run.awaiting_approval` when a run planned and now awaits
    its approval."""
    def ended(record: RunRecord) -> None:
        if record.status == AWAITING:
            notifier.notify(AWAITING_EVENT, instance_event(
                AWAITING_EVENT, record.module, record.instance, record.tenant,
                at=time.time(), run_id=record.id, status=AWAITING), record.tenant,
                record.client_id)
            return
        notifier.run_finished(record)
        at = record.finished_at if record.finished_at is not None else time.time()
        for event, status in instance_events(
                record.operation, record.status, (record.drift or {}).get("status"),
                expired=record.subject == REAPER.subject and _reaped(record)):
            notifier.notify(event, instance_event(
                event, record.module, record.instance, record.tenant, at=at,
                run_id=record.id, status=status), record.tenant, record.client_id)

    return ended


def _reaped(record: RunRecord) -> bool:
    """The reaper's destroy was of an instance that did expire: not one refused because
    a later apply moved the expiry (409) or the instance was gone (404)."""
    return (record.problem or {}).get("status") not in (404, 409)


def serve(parts: Parts) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully; returns the exit status."""
    server = parts.server
    config = server.config
    _install_signals(parts)
    server.service.start()
    if parts.renewer is not None:
        parts.renewer.start()
    if parts.notifier is not None:
        parts.notifier.start()
    if parts.drift is not None:
        parts.drift.start()
    logger.info(
        "serving %s on %s (auth %s, backend %s)", ", ".join(server.service.modules),
        server.url, config.auth, config.backend.name,
        extra={"modules": list(server.service.modules), "url": server.url,
               "state_dir": str(config.state_dir)},
    )
    # What start-up made (modules, schemas, libraries) lives as long as the process: out
    # of the collector's way, a full collection takes about 1 ms instead of 50 (measured
    # in the middle of a request, on the apply benchmark).
    gc.collect()
    gc.freeze()
    # A request allocates thousands of objects, nearly all freed at once by their counts:
    # at the default 700 the young generation was collected about once an apply (0.08 ms,
    # and every tenth a 0.5 ms middle one), in the run's way. Cycles wait a little longer.
    gc.set_threshold(GC_YOUNG, 20, 10)
    server.serve_forever(poll_interval=0.2)
    _stop(parts)
    logger.info("stopped")
    return 0


#: Allocations between collections of the young generation (CPython's default is 700).
GC_YOUNG = 20_000


def _install_signals(parts: Parts) -> None:
    """SIGTERM and SIGINT stop (a second one interrupts the runs); SIGHUP reloads TLS
    files (without a handler it would end the server)."""
    server = parts.server
    config = server.config
    signals = 0
    mutex = threading.Lock()

    def stop(signum: int) -> None:
        nonlocal signals
        with mutex:
            signals += 1
            first = signals == 1
        if not first:
            logger.warning("second signal: interrupting terraform runs now")
            server.service.runner.interrupt_all()
            return
        logger.info("signal %s: stopping; runs in flight may take up to %gs",
                    signal.Signals(signum).name, config.shutdown_grace)
        server.stopping.set()
        server.shutdown()  # waits for serve_forever to return (in the main thread)

    def hang_up() -> None:
        if server.certificates is None or config.tls_cert is None or config.tls_key is None:
            logger.info("SIGHUP: no TLS files to reload (TFSERVER_TLS_CERT/KEY are not set)")
            return
        server.certificates.reload(config.tls_cert, config.tls_key)

    # Handlers only start a thread: logging (or any I/O) inside a handler can land in the
    # middle of the main thread's own write to stderr and fail as a reentrant call, which
    # lost the signal.
    def on_signal(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=stop, args=(signum,), name="stop", daemon=True).start()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=hang_up, name="reload-tls", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)


def _stop(parts: Parts) -> None:
    """After serve_forever: close the listener, cancel queued runs, give runs and requests
    in flight the grace period, then interrupt what is left, and release everything."""
    server = parts.server
    config = server.config
    # Close the listener at once: a load balancer sees refused connections and moves on,
    # instead of connections that wait unaccepted and are reset at exit.
    server.socket.close()
    if parts.renewer is not None:
        parts.renewer.stop_event.set()
    if parts.challenge is not None:
        parts.challenge.shutdown()
        parts.challenge.server_close()
    if parts.drift is not None:
        parts.drift.stop_event.set()  # no check starts once the queues close
    runs = server.service.runs
    dropped = runs.close_queues()
    if dropped:
        logger.info("canceled %d queued run(s)", dropped)
    deadline = time.monotonic() + config.shutdown_grace
    if not (runs.wait_idle(config.shutdown_grace)
            and server.wait_idle(max(0.0, deadline - time.monotonic()))):
        count = server.service.runner.interrupt_all()
        logger.warning("grace period over: interrupted %d terraform run(s)", count)
        runs.wait_idle(config.kill_grace + 5)
        server.wait_idle(config.kill_grace + 5)
    server.server_close()
    if parts.notifier is not None:
        parts.notifier.close()  # after the last run's end: its webhook is kept
    server.service.close()
    server.service.runner.close()  # the exits still awaited (process.py)


def _check_approvals(config: Config, policy: Policy, modules: Mapping[str, Module]) -> None:
    """ConfigError for approvals the settings cannot give: any with the sqs engine, or
    a separate approver with authentication off (every caller is then the one subject
    `local`, and no gated run could ever be approved)."""
    if config.queue.engine == "sqs" and policy.requires_approval:
        raise ConfigError(f"{config.policy}: require_approval works with TFSERVER_QUEUE=local "
                          "only (the sqs engine cannot hold an instance's queue yet)")
    if config.auth == "jwt":
        return
    for name in sorted(modules):
        limits = policy.limits(name, LOCAL_TENANT)
        if limits.require_approval and limits.separate_approver:
            raise ConfigError(f"{config.policy}: modules.{name}: separate_approver needs "
                              "TFSERVER_AUTH=jwt (with authentication off every caller is "
                              "`local`, and nobody else could approve its runs)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tfserver` and `python -m tfserver`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["token"]:
        from .cli.token import main as token_main

        return token_main(args[1:], os.environ)
    if args[:1] == ["run"]:
        from .cli.run import main as run_main

        return run_main(args[1:], os.environ)
    if args[:1] == ["worker"]:  # the shorthand of `serve --role worker`
        args = [*args[1:], "--role", "worker"]
    elif args[:1] == ["serve"]:
        args = args[1:]
    # Everything the server writes (state, plans, keys, var files) is for its user only.
    os.umask(0o077)
    # Terraform may print numbers longer than Python's default limit for int() (4,300
    # digits); request bodies are bounded far below this on their own (jsonbody).
    sys.set_int_max_str_digits(MAX_INT_DIGITS)
    try:
        config = load(args, os.environ)
        logs.configure(config.log_level, config.log_format)
        parts = build(config)
        parts.affinity.pin()  # before the service starts its threads: they inherit it
    except TFServerError as e:
        print(f"tfserver: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tfserver: error: cannot listen: {e.strerror}", file=sys.stderr)
        return 2
    return serve(parts)


if __name__ == "__main__":
    sys.exit(main())
