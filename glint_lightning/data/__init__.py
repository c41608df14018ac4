"""Data: the HDF5 tile format, the DataModule, leak-free splits and folds, batch augmentations and the built-in
synthetic set."""

from glint_lightning.data.datamodule import EpochShuffleSampler, GlintDataModule
from glint_lightning.data.h5 import H5Tiles, TileKeys, inspect_tile_file
from glint_lightning.data.splits import assign_folds

__all__ = ["EpochShuffleSampler", "GlintDataModule", "H5Tiles", "TileKeys", "assign_folds", "inspect_tile_file"]
