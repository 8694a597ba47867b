"""`python -m tfserver` / `tfserver`: build the config, wire the parts, serve until told to stop."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from . import logs
from .auth import make_authenticator
from .backend import make_backend
from .config import Config, load
from .errors import ConfigError
from .modules import discover
from .server import TFServer
from .service import Service
from .terraform import Terraform

logger = logging.getLogger("tfserver")


def build(config: Config) -> TFServer:
    """Every part of a server from its config (the server is bound but not serving)."""
    modules = discover(config.modules_dir)
    terraform = Terraform(
        binary=config.terraform_bin,
        base_env=config.terraform_env,
        cli_config_file=config.cli_config_file,
        kill_grace=config.kill_grace,
    )
    service = Service(config, modules, terraform, make_backend(config))
    service.prepare()
    authenticator = make_authenticator(config)
    ssl_context = None
    if config.tls_cert is not None and config.tls_key is not None:
        from .tls import context_from_files

        ssl_context = context_from_files(config.tls_cert, config.tls_key)
    return TFServer(config, service, authenticator, ssl_context)


def serve(server: TFServer) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully; returns the exit status."""
    config = server.config

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if server.stopping.is_set():
            logger.warning("second signal: interrupting terraform runs now")
            server.service.terraform.interrupt_all()
            return
        logger.info("signal %s: stopping; runs in flight may take up to %gs",
                    signal.Signals(signum).name, config.shutdown_grace)
        server.stopping.set()
        # shutdown() waits for serve_forever to return: never call it from its own thread.
        threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.service.start()
    logger.info(
        "serving %s on %s (auth %s, backend %s)", ", ".join(server.service.modules),
        server.url, config.auth, config.backend,
        extra={"modules": list(server.service.modules), "url": server.url,
               "state_dir": str(config.state_dir)},
    )
    server.serve_forever(poll_interval=0.2)
    if not server.wait_idle(config.shutdown_grace):
        count = server.service.terraform.interrupt_all()
        logger.warning("grace period over: interrupted %d terraform run(s)", count)
        server.wait_idle(config.kill_grace + 5)
    server.server_close()
    server.service.close()
    logger.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tfserver` and `python -m tfserver`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["token"]:
        from .client import main as token_main

        return token_main(args[1:], os.environ)
    try:
        config = load(args, os.environ)
        logs.configure(config.log_level)
        server = build(config)
    except ConfigError as e:
        print(f"tfserver: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tfserver: error: cannot listen: {e.strerror}", file=sys.stderr)
        return 2
    return serve(server)


if __name__ == "__main__":
    sys.exit(main())
