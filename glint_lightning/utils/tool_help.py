"""`--help` of a command lists the options of its primary config with their comments: Hydra's `$CONFIG` prints
the composed values but drops the comments, so a help template says `${glint_options:<config name>}` instead."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from glint_lightning.utils.config_dir import CONFIG_DIR

_OPTION = re.compile(r"^(?!defaults:|hydra:)[A-Za-z_]\w*:")  # a top-level key of the primary config


def options_help(config_name: str) -> str:
    """Each top-level `key: default  # comment` line of conf/<config_name>.yaml, indented, `$` escaped for Hydra's
    string.Template."""
    text = (Path(CONFIG_DIR) / f"{config_name}.yaml").read_text()
    return "\n".join("  " + line.replace("$", "$$") for line in text.splitlines() if _OPTION.match(line))


def register_help_resolver() -> None:
    """Make `${glint_options:<config name>}` available to the help templates (hydra_app calls it)."""
    if not OmegaConf.has_resolver("glint_options"):
        OmegaConf.register_new_resolver("glint_options", options_help)
