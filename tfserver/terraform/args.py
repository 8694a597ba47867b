"""Terraform's command lines and environments, built by pure functions (tested as tables):
`-input=false -no-color` always, `-json` where the command streams events, the environment an
allowlist plus terraform's own settings."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


#: Commands that take `-json` and report through the event stream.
JSON_COMMANDS = frozenset({"apply", "plan", "destroy"})


def build_args(
    command: str,
    *,
    var_file: Path | None = None,
    lock_timeout: float | None = None,
    destroy: bool = False,
    refresh_only: bool = False,
    backend_config: Sequence[tuple[str, str]] = (),
    reconfigure: bool = False,
    plan_out: Path | None = None,
    plan_file: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The argument list for one terraform command (without the binary).

    Always non-interactive and colourless; `-json` where the command streams events. A
    plan may be saved (`plan_out`), and an apply may apply a saved plan (`plan_file`,
    which takes no variables); `refresh_only` makes a plan a drift check, and `show` of a
    `plan_file` reads the saved plan as JSON.
    """
    words = command.split()
    args = list(words)
    verb = words[0]
    if verb in ("apply", "destroy"):
        args += ["-json", "-auto-approve"]
    elif verb == "plan":
        args += ["-json"]
        if destroy:
            args.append("-destroy")
        elif refresh_only:
            args.append("-refresh-only")
    elif verb == "show":
        args += ["-json"]
    if verb in ("apply", "destroy", "plan", "init"):
        args.append("-input=false")
    args.append("-no-color")
    takes_lock = verb in ("apply", "destroy", "plan") or words[:2] in (
        ["workspace", "new"],
        ["workspace", "delete"],
    )
    if lock_timeout is not None and takes_lock:
        args.append(f"-lock-timeout={max(0, int(lock_timeout))}s")
    if var_file is not None and plan_file is None:
        args.append(f"-var-file={var_file}")
    if plan_out is not None and verb == "plan":
        args.append(f"-out={plan_out}")
    if verb == "init":
        if reconfigure:
            args.append("-reconfigure")
        args += [f"-backend-config={k}={v}" for k, v in backend_config]
    if verb == "force-unlock":
        args.append("-force")
    args += list(extra)
    if plan_file is not None and verb in ("apply", "show"):
        args.append(str(plan_file))
    return args


def build_env(
    base: Mapping[str, str], *, workspace: str, cli_config_file: Path | None,
    memory_limit: int = 0,
) -> dict[str, str]:
    """The whole environment of a terraform process: the allowlist plus terraform's own."""
    env = dict(base)
    if memory_limit:
        # Go's soft limit: the collector works harder well before the hard cap (RLIMIT_AS,
        # set by the runner) would make an allocation fail.
        env["GOMEMLIMIT"] = f"{memory_limit // 2 // (1024 * 1024)}MiB"
    env["TF_IN_AUTOMATION"] = "1"
    env["TF_INPUT"] = "0"
    env["CHECKPOINT_DISABLE"] = "1"  # no version check calls to HashiCorp on every run
    env["TF_WORKSPACE"] = workspace
    if cli_config_file is not None:
        env["TF_CLI_CONFIG_FILE"] = str(cli_config_file)
    return env


def cli_config_text(plugin_cache_dir: Path, provider_mirror: Path | None) -> str:
    """A terraform CLI config: a shared plugin cache, and an offline provider mirror if set."""
    lines = [f"plugin_cache_dir = {json.dumps(str(plugin_cache_dir))}"]
    if provider_mirror is not None:
        lines += [
            "provider_installation {",
            "  filesystem_mirror {",
            f"    path = {json.dumps(str(provider_mirror))}",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"
