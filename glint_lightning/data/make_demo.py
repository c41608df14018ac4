"""`python -m glint_lightning.data.make_demo out=data/demo n_train=2048 n_val=256 n_test=256 tile=64 seed=0`."""

from __future__ import annotations

import sys

from glint_lightning.data.demo import make_demo
from glint_lightning.errors import exit_on_user_error, parse_options

DEFAULTS = {"out": "data/demo", "n_train": 2048, "n_val": 256, "n_test": 256, "tile": 64, "seed": 0}


def main(argv: list[str]) -> None:
    args = parse_options("make_demo", DEFAULTS, argv)
    paths = make_demo(**args)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    with exit_on_user_error():
        main(sys.argv[1:])
