"""Training throughput of glint_lightning (Lightning Trainer + GlintModule + GlintDataModule) against a plain
PyTorch loop over the same model, tiles, batch size, augmentation, loss and optimizer; measured alternately in
one run. Prints tiles/s of each and the ratio (goal >= 0.97).

    python -m benchmarks.framework_overhead [--rounds 3] [--tiles 256] [--tile 64] [--batch 16]
"""

from __future__ import annotations

import argparse
from functools import partial

import lightning as L
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from benchmarks.common import Stopwatch, config, demo_tiles, median_rate
from glint_lightning.data.augment import AugmentConfig, augment_batch
from glint_lightning.data.h5 import collate_tiles
from glint_lightning.train import build_module
from glint_lightning.utils.seeding import STREAM_AUGMENT, derive_seed

WARMUP = 2  # batches left out of the timing on both sides


class EpochTimer(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.current.ready == WARMUP + 1:
            self.watch = Stopwatch().__enter__()

    def on_train_epoch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.watch.__exit__()


def framework_epoch(cfg) -> tuple[int, float]:
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    module = build_module(cfg)
    module.set_depth_stats(*datamodule.depth_stats)
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    batches = len(datamodule.train_dataloader()) - WARMUP
    return batches * cfg.data.batch_size, timer.watch.seconds


def plain_epoch(cfg) -> tuple[int, float]:
    """What a hand-written script does: DataLoader, forward, masked loss, backward, Adam step."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    module = build_module(cfg)  # only for the same network, loss and normalisation
    module.set_depth_stats(*datamodule.depth_stats)
    net, loss_fn = module.model.train(), module.loss_fn
    mean, std = module.depth_mean, module.depth_std
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optimizer.lr)
    augment = AugmentConfig(**cfg.data.augment)
    loader = DataLoader(
        datamodule.datasets["train"],
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_tiles,
    )
    for step, batch in enumerate(loader):
        if step == WARMUP:
            watch = Stopwatch().__enter__()
        g = torch.Generator().manual_seed(derive_seed(0, STREAM_AUGMENT, step))
        batch = augment_batch(batch, augment, g)
        x = torch.where(batch["valid"], (batch["depth"] - mean) / std, 0.0)
        loss = loss_fn(net(x), batch["mask"], batch["valid"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    watch.__exit__()
    return (len(loader) - WARMUP) * cfg.data.batch_size, watch.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    path = demo_tiles(args.tiles, args.tile)
    cfg = config(
        "data=h5",
        f"data.train_path={path}",
        "data.val_fraction=0.1",
        f"data.batch_size={args.batch}",
        "model.base_channels=16",
        "model.depth=3",
        "loss=dice",
    )
    rates = {"plain loop": [], "glint_lightning": []}
    for _ in range(args.rounds):  # alternate, so drift in machine load hits both alike
        rates["plain loop"].append(median_rate(partial(plain_epoch, cfg), 1))
        rates["glint_lightning"].append(median_rate(partial(framework_epoch, cfg), 1))
    plain, ours = (sorted(r)[len(r) // 2] for r in rates.values())
    print(
        f"framework overhead: U-Net(16, depth 3), {args.tile}px tiles, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} alternating epochs"
    )
    print(f"  plain PyTorch loop   {plain:8.1f} tiles/s")
    print(f"  glint_lightning      {ours:8.1f} tiles/s")
    print(f"  ratio                {ours / plain:8.3f}   (goal >= 0.97)")


if __name__ == "__main__":
    main()
