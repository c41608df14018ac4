"""glint-lightning: segment glints in single-channel depth images with Lightning + Hydra."""

__version__ = "0.1.0"
