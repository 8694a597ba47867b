"""The state folder, made before anything uses it: private, with its sub-folders and the
CLI config file terraform is started with (so `Terraform` is built with it, once)."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
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


def spool_dir(config: Config) -> Path:
    """Where terraform's output files go while it runs (terraform/follow.py).

    On tmpfs when there is one (TFSERVER_TMP_DIR, else /dev/shm): on disk, terraform's
    fsync of its state flushed them too, about 2 ms of every apply that changed state (as
    var files did). Named after the state folder, so a server restarted after a crash
    finds what the dead one's terraform wrote (tmpfs outlives the process, not the
    machine: after a reboot nothing of a run runs on anyway). A folder there that is not
    ours, or a link, is never used: then `<state>/spool`.
    """
    base = config.tmp_dir
    shm = Path("/dev/shm")  # noqa: S108 - a folder of our own in it, mode 0700, checked
    if base is None and shm.is_dir() and os.access(shm, os.W_OK):
        base = shm
    if base is not None:
        digest = hashlib.sha256(str(config.state_dir.absolute()).encode()).hexdigest()[:16]
        folder = base / f"tfserver-spool-{digest}"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            info = folder.lstat()
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                return private_dir(folder)
        except OSError as e:
            logger.warning("spool folder %s cannot be used: %s", folder, e.strerror)
        else:
            logger.warning("spool folder %s is not this user's; using the state folder",
                           folder)
    return private_dir(config.state_dir / "spool")
