"""The state folder, made before anything uses it: private, with its sub-folders and the
CLI config file terraform is started with (so `Terraform` is built with it, once)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config
from ..files import private_dir, tighten_tree, write_private
from ..terraform.args import cli_config_text

logger = logging.getLogger(__name__)

#: The folders under the state folder: working copies, var files (without tmpfs), providers,
#: and terraform's output files while it runs (they outlive a server that dies).
SUB_FOLDERS = ("work", "tmp", "plugin-cache", "spool")


def prepare_state(config: Config) -> Path:
    """Create the state folder (owner only) and its sub-folders, and write terraform's CLI
    config unless the settings name one; returns the CLI config file terraform is to use."""
    state = private_dir(config.state_dir)
    changed = tighten_tree(state)
    if changed:
        logger.warning("state folder %s: took group and other permissions off %d "
                       "files and folders", state, changed)
    for sub in SUB_FOLDERS:
        private_dir(state / sub)
    if config.cli_config_file is not None:
        return config.cli_config_file
    cli_config_file = state / "terraformrc"
    write_private(cli_config_file, cli_config_text(
        state / "plugin-cache", config.provider_mirror).encode())
    return cli_config_file
