"""The README is the user's manual: every documented train command and config example must compose."""

import importlib.util
import re
import shlex

import pytest
from hydra import compose, initialize_config_dir

from glint_lightning.utils.config_dir import CONFIG_DIR
from tests.helpers import REPO

README = (REPO / "README.md").read_text()


def _train_commands() -> list[list[str]]:
    cmds = []
    for line in README.splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("python -m glint_lightning.train"):
            cmds.append(shlex.split(line)[3:])
        elif line.startswith("glint-train ") and "--config-dir" not in line:  # that one needs the user's folder
            cmds.append([a for a in shlex.split(line)[1:] if not a.startswith("[")])
    return cmds


def _table_examples() -> list[list[str]]:
    examples = []
    for row in README.splitlines():
        cells = row.split("|")
        if len(cells) == 5 and cells[1].strip().strip("`") and "=" in cells[3]:
            examples += [shlex.split(code) for code in re.findall(r"`([^`]+=[^`]+)`", cells[3])]
    return examples


def _composable(args: list[str]) -> list[str]:
    """Drop what only Hydra's launcher handles; take the first value of sweep lists."""
    out = []
    for arg in args:
        if arg in ("-m", "--cfg", "job") or arg.startswith(("hydra.", "ckpt_path=")):
            continue
        key, _, value = arg.partition("=")
        if "," in value and not value.startswith(("[", "{")):
            value = value.split(",")[0]
        out.append(f"{key}={value}" if value else key)
    return out


@pytest.mark.parametrize("args", _train_commands() + _table_examples(), ids=lambda a: " ".join(a)[:60])
def test_documented_overrides_compose(args):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=_composable(args))
    assert cfg.model._target_ and cfg.data._target_


def test_readme_documents_at_least_the_core_commands():
    assert len(_train_commands()) >= 6 and len(_table_examples()) >= 10
    for module in set(re.findall(r"python -m (glint_lightning[\w.]*\w)", README)):
        assert importlib.util.find_spec(module) is not None, module
    scripts = (REPO / "pyproject.toml").read_text()
    for script in set(re.findall(r"(?:^|`|&& )(glint-[a-z-]+[a-z])\b", README, re.MULTILINE)) - {"glint-lightning"}:
        assert f'{script} = "glint_lightning.' in scripts, f"README names {script}, which is no console script"
