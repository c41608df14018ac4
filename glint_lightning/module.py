"""The LightningModule: any segmentation network + any loss, metrics on valid pixels, optimizer and schedule
from config. Everything it is built from is plain data in `hparams`, so checkpoints rebuild it anywhere and load
with `torch.load(weights_only=True)`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn

from glint_lightning import __version__
from glint_lightning.metrics import pixel_metrics
from glint_lightning.seeding import STREAM_DROPOUT, derive_seed


@contextmanager
def _native_bincount_on_cpu(device: torch.device) -> Iterator[None]:
    """torchmetrics replaces torch.bincount by an [N, bins] mesh whenever deterministic mode is on: gigabytes for
    a validation split's pixels. On the CPU torch.bincount is deterministic already, so let it run there."""
    if device.type != "cpu" or not torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


class GlintModule(L.LightningModule):
    """Glint segmentation.

    Args:
        model: `_target_` config of the network (B, C, H, W) -> (B, 1, H, W) logits.
        loss: `_target_` config of a loss taking (logits, target, valid).
        optimizer: `_target_` config of a torch optimizer, without params.
        scheduler: {scheduler: `_target_` config without optimizer, interval, frequency, warmup_epochs,
            warmup_start_factor} or None.
        threshold: probability above which a pixel is a glint.
        ap_bins: thresholds for average precision (None = exact, memory grows with the split).
        seed: keys dropout randomness to (seed, global step) for exact resume.
        config: the whole composed run config, stored for provenance.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        loss: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        threshold: float = 0.5,
        ap_bins: int | None = 200,
        seed: int = 0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: nn.Module = instantiate(model)
        self.loss_fn: nn.Module = instantiate(loss)
        self.register_buffer("depth_mean", torch.tensor(0.0))
        self.register_buffer("depth_std", torch.tensor(1.0))
        self.val_metrics = pixel_metrics("val", threshold, ap_bins)
        self.test_metrics = pixel_metrics("test", threshold, ap_bins)

    def set_depth_stats(self, mean: float, std: float) -> None:
        """Normalisation statistics of the training data; part of the state dict so inference reuses them."""
        self.depth_mean.fill_(mean)
        self.depth_std.fill_(std)

    def forward(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Depth in mm (B, 1, H, W) and validity -> logits (B, 1, H, W); invalid pixels enter as 0."""
        x = (depth - self.depth_mean) / self.depth_std
        return self.model(torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(derive_seed(self.hparams.seed, STREAM_DROPOUT, self.global_step))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["depth"], batch["valid"])
        loss = self.loss_fn(logits, batch["mask"], batch["valid"])
        n = batch["depth"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        for name, value in getattr(self.loss_fn, "last_terms", {}).items():
            self.log(f"train/loss_{name}", value, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        logits = self(batch["depth"], batch["valid"])
        loss = self.loss_fn(logits, batch["mask"], batch["valid"])
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", batch_size=logits.shape[0])
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        valid = batch["valid"]
        with _native_bincount_on_cpu(logits.device):
            metrics.update(torch.sigmoid(logits)[valid], batch["mask"][valid].int())
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val")
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer, _partial_=True)(self.parameters())
        sched_cfg = self.hparams.scheduler
        if not sched_cfg or sched_cfg.get("scheduler") is None:
            return optimizer
        scheduler = instantiate(sched_cfg["scheduler"], _partial_=True)(optimizer)
        warmup = int(sched_cfg.get("warmup_epochs", 0) or 0)
        if warmup > 0:
            ramp = torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=float(sched_cfg.get("warmup_start_factor", 0.1)), total_iters=warmup
            )
            scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, scheduler], milestones=[warmup])
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": sched_cfg.get("interval", "epoch"),
                "frequency": int(sched_cfg.get("frequency", 1)),
            },
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["glint_lightning_version"] = __version__
