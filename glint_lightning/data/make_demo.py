"""`glint-make-demo out=data/demo n_train=2048 n_val=256 n_test=256 tile=64 seed=0` (options: conf/make_demo.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from glint_lightning.data.demo import make_demo
from glint_lightning.utils.cli import hydra_app
from glint_lightning.utils.errors import GlintError


@hydra_app("make_demo")
def main(cfg: DictConfig) -> None:
    """glint-make-demo: write the synthetic glint data set's train/val/test files."""
    counts = {k: cfg[k] for k in ("n_train", "n_val", "n_test")}
    if cfg.tile < 16 or min(counts.values()) < 0:
        raise GlintError(
            f"tile={cfg.tile}, n_train={cfg.n_train}, n_val={cfg.n_val}, n_test={cfg.n_test}; use tile >= 16 and "
            "tile counts >= 0"
        )
    for split, path in make_demo(cfg.out, **counts, tile=cfg.tile, seed=cfg.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
