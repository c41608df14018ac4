"""The LightningModule: any segmentation network + any loss, metrics on valid pixels, optimizer and schedule
from config. Everything it is built from is plain data in `hparams`, so checkpoints rebuild it anywhere and load
with `torch.load(weights_only=True)`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MetricCollection

from glint_lightning import __version__
from glint_lightning.checkpoints.reader import load_checkpoint, network_config
from glint_lightning.metrics import OBJECT_METRICS, ObjectMetric, pixel_metrics
from glint_lightning.models.base import forward_any_size
from glint_lightning.models.common import model_part
from glint_lightning.models.depth_input import DepthInput
from glint_lightning.scoring import score_batch
from glint_lightning.utils.errors import TrainingDiverged
from glint_lightning.utils.seeding import STREAM_DROPOUT, derive_seed

# Keys of the model config that say where the initial weights came from, not what the network is: a checkpoint
# whose stored values differ still resumes (its own weights replace them anyway).
WEIGHT_SOURCE_KEYS = ("pretrained", "strict")


def _rename_old_depth_buffers(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints written before DepthInput kept the statistics as `depth_mean` / `depth_std`; those written before
    `data.depth_clip` have no clip range: -inf/+inf, i.e. no clip, which is what they were trained with."""
    for old, new in (("depth_mean", "depth_input.mean"), ("depth_std", "depth_input.std")):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    if prefix + "depth_input.mean" in state_dict:
        for key, bound in (("depth_input.low", -math.inf), ("depth_input.high", math.inf)):
            state_dict.setdefault(prefix + key, torch.tensor(bound))


class GlintModule(L.LightningModule):
    """Glint segmentation.

    Args:
        model: `_target_` config of the network (B, C, H, W) -> (B, 1, H, W) logits (callbacks.freeze freezes
            named parts of it).
        loss: `_target_` config of a loss taking (logits, target, valid).
        optimizer: `_target_` config of a torch optimizer, without params.
        scheduler: {scheduler: `_target_` config without optimizer, interval, frequency, warmup_epochs,
            warmup_start_factor} or None.
        threshold: probability above which a pixel is a glint.
        ap_bins: thresholds for average precision (None = exact, memory grows with the split).
        seed: keys dropout randomness to (seed, global step) for exact resume.
        aux_weight: weight of the auxiliary head's loss, for networks that have one.
        tile_size: (h, w) of the training tiles: the window size for full-frame prediction.
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
        aux_weight: float = 0.5,
        tile_size: list[int] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: nn.Module = instantiate(model)
        self.loss_fn: nn.Module = instantiate(loss)
        self.depth_input = DepthInput()
        self.register_load_state_dict_pre_hook(_rename_old_depth_buffers)
        self.val_metrics = pixel_metrics("val", threshold, ap_bins)
        self.test_metrics = pixel_metrics("test", threshold, ap_bins)
        self.test_objects = ObjectMetric(threshold)  # glint-level counts: CPU work per tile, so test stage only
        # what the end-of-run calibration chose to do to thresholded test masks (a PostProcess's `apply`), as eval does
        self.test_postprocess: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def set_threshold(self, threshold: float) -> None:
        """Use a (calibrated) probability threshold for the metrics and for inference from now on."""
        self.hparams.threshold = threshold
        for metric in (*self.val_metrics.values(), *self.test_metrics.values(), self.test_objects):
            if hasattr(metric, "threshold"):
                metric.threshold = threshold

    def set_depth_stats(self, mean: float, std: float, clip: tuple[float, float] | None = None) -> None:
        """Normalisation statistics of the training data and the range (mm) depth is clipped to before them (None: no
        clip); part of the state dict so inference reuses them."""
        self.depth_input.set_statistics(mean, std)
        self.depth_input.set_clip(clip)

    @property
    def depth_mean(self) -> torch.Tensor:
        return self.depth_input.mean

    @property
    def depth_std(self) -> torch.Tensor:
        return self.depth_input.std

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> GlintModule:
        """Rebuild (in eval mode) from a checkpoint without fetching `model.pretrained` again."""
        return cls.from_checkpoint_dict(load_checkpoint(path), map_location)

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict[str, Any], map_location: str | torch.device = "cpu") -> GlintModule:
        """from_checkpoint for a checkpoint already loaded (with checkpoints.reader.load_checkpoint)."""
        hparams = dict(ckpt["hyper_parameters"])
        hparams["model"] = network_config(hparams["model"])
        module = cls(**hparams)
        module.load_state_dict(ckpt["state_dict"])
        return module.to(map_location).eval()

    def _network(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Normalise, zero invalid pixels, run on any tile or frame size (padded to the network's stride and cropped
        back, for any network that meets the contract in models/common.py)."""
        return forward_any_size(self.model, self.depth_input(depth, valid))

    def forward(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Depth in mm (B, 1, H, W) and validity -> logits (B, 1, H, W); invalid pixels enter as 0."""
        out = self._network(depth, valid)
        return out["out"] if isinstance(out, dict) else out

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(derive_seed(self.hparams.seed, STREAM_DROPOUT, self.global_step))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._network(batch["depth"], batch["valid"])
        logits = out["out"] if isinstance(out, dict) else out
        loss = self.loss_fn(logits, batch["mask"], batch["valid"])
        n = batch["depth"].shape[0]
        for name, value in getattr(self.loss_fn, "last_terms", {}).items():
            self.log(f"train/loss_{name}", value, on_step=False, on_epoch=True, batch_size=n)
        if isinstance(out, dict) and "aux" in out:
            aux = self.loss_fn(out["aux"], batch["mask"], batch["valid"])
            self.log("train/loss_aux", aux, on_step=False, on_epoch=True, batch_size=n)
            loss = loss + self.hparams.aux_weight * aux
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def on_train_epoch_end(self) -> None:
        # Checked once an epoch, from the logged mean, so that no step waits for the GPU.
        loss = self.trainer.callback_metrics.get("train/loss_epoch")
        if loss is not None and not torch.isfinite(loss):
            lr = self.hparams.optimizer.get("lr")
            raise TrainingDiverged(
                f"train/loss is {float(loss)} in epoch {self.current_epoch}: training diverged; lower optimizer.lr "
                f"(now {lr}) or set trainer.gradient_clip_val=1.0"
            )

    def _evaluate(
        self, batch: dict[str, torch.Tensor], stage: str, metrics: MetricCollection, objects: ObjectMetric | None = None
    ) -> dict[str, torch.Tensor]:
        """The shared scoring path (scoring.score_batch), logged under `stage`."""
        post = self.test_postprocess if stage == "test" else None
        threshold = float(self.hparams.threshold)
        loss, logits, _ = score_batch(self, batch, self.loss_fn, threshold, metrics, objects, postprocess=post)
        n, bar = batch["depth"].shape[0], stage == "val"
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=bar, batch_size=n, sync_dist=True)
        self.log_dict(metrics, on_epoch=True, prog_bar=bar)
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "val", self.val_metrics)

    def on_test_epoch_start(self) -> None:
        self.test_objects.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "test", self.test_metrics, self.test_objects)

    def on_test_epoch_end(self) -> None:
        # compute() sums the counts over DDP ranks, so every rank holds the same values and "max" syncs them exactly
        values = self.test_objects.compute()
        self.log_dict({f"test/object_{k}": values[k] for k in OBJECT_METRICS}, sync_dist=True, reduce_fx="max")

    def _param_groups(self, lr: float, lr_mult: Mapping[str, float]) -> list[dict[str, Any]] | list[nn.Parameter]:
        """Trainable parameters; with `lr_mult`, one named group per part at lr x mult, plus `rest` at lr."""
        trainable = [p for p in self.parameters() if p.requires_grad]  # frozen parts join when unfrozen
        if not lr_mult:
            return trainable
        groups, taken = [], set()
        for part, mult in lr_mult.items():
            params = [p for p in model_part(self.model, part, "optimizer.lr_mult").parameters() if p.requires_grad]
            taken |= {id(p) for p in params}
            if params:
                groups.append({"params": params, "lr": lr * float(mult), "name": part})
        return [{"params": [p for p in trainable if id(p) not in taken], "name": "rest"}, *groups]

    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer)
        lr_mult = opt_cfg.pop("lr_mult", None) or {}
        optimizer = instantiate(opt_cfg, _partial_=True)(self._param_groups(opt_cfg["lr"], lr_mult))
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
        try:
            metrics = self.trainer.callback_metrics
        except RuntimeError:  # not attached to a Trainer (saved by hand)
            metrics = {}
        checkpoint["metrics"] = {k: float(v) for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1}
