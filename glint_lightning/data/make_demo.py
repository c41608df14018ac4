"""`python -m glint_lightning.data.make_demo out=data/demo n_train=2048 n_val=256 n_test=256 tile=64 seed=0`."""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from glint_lightning.data.demo import make_demo
from glint_lightning.errors import GlintError, exit_on_user_error

DEFAULTS = {"out": "data/demo", "n_train": 2048, "n_val": 256, "n_test": 256, "tile": 64, "seed": 0}


def main(argv: list[str]) -> None:
    args = OmegaConf.merge(DEFAULTS, OmegaConf.from_dotlist(argv))
    unknown = set(args) - set(DEFAULTS)
    if unknown:
        raise GlintError(f"make_demo: unknown option(s) {sorted(unknown)}; valid options are {sorted(DEFAULTS)}")
    paths = make_demo(**args)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    with exit_on_user_error():
        main(sys.argv[1:])
