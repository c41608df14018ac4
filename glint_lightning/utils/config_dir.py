"""Where the configs are: inside the installed package (a wheel carries the repo's conf/ as glint_lightning/conf),
else the repo's top-level conf/ (a checkout or an editable install). One source of truth: the repo's conf/."""

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent.parent / "conf"
CONFIG_DIR = str(_PACKAGED if _PACKAGED.is_dir() else _PACKAGED.parent.parent / "conf")
