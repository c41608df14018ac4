"""`glint-export ckpt_path=run/checkpoints/best.ckpt format=pth|torchscript|onnx|safetensors [out=...]`

Hands a trained model to people without this framework. `pth` is the old script's dict (`model_state_dict` loads
into the network); `safetensors` holds the network's tensors only, with a JSON sidecar saying what they belong to
(nothing is unpickled to read it); `torchscript` and `onnx` take depth in mm and validity, any batch size and any
H, W (normalisation, padding to the network's stride and cropping are inside). Every export is read back and
compared with the PyTorch model. Any network that meets the contract in models/common.py exports, also a user's.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from glint_lightning import __version__
from glint_lightning.checkpoints.io import atomic_output, atomic_torch_save
from glint_lightning.checkpoints.reader import load_checkpoint, sidecar_path
from glint_lightning.inference.loading import load_pth, load_safetensors
from glint_lightning.models.base import SegmentationNetwork, network_stride
from glint_lightning.models.common import check_network
from glint_lightning.models.depth_input import DepthInput
from glint_lightning.module import GlintModule
from glint_lightning.utils.cli import hydra_app
from glint_lightning.utils.errors import GlintError

SUFFIX = {"pth": ".pth", "torchscript": ".pt", "onnx": ".onnx", "safetensors": ".safetensors"}
MAX_DIFF = 1e-3  # largest difference in logits from the PyTorch model an export may show


class _Logits(nn.Module):
    """The network's plain forward, logits only (a dict's "out")."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out["out"] if isinstance(out, dict) else out


class _Network(SegmentationNetwork):
    """The network's logits for inputs padded to its stride (`core`: traced for TorchScript), behind the base
    forward that pads any input and crops back."""

    def __init__(self, core: nn.Module, stride: int) -> None:
        super().__init__()
        self.core, self.stride = core, stride

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(x)


class ExportedGlintModel(nn.Module):
    """depth (B, 1, H, W) in mm and valid (B, 1, H, W) bool -> logits (B, 1, H, W), for any B, H, W: the same
    DepthInput and the same pad-forward-crop as training."""

    def __init__(self, core: nn.Module, stride: int, depth_input: DepthInput) -> None:
        super().__init__()
        self.depth_input, self.network = copy.deepcopy(depth_input), _Network(core, stride)

    def forward(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        out = self.network(self.depth_input(depth, valid))
        assert isinstance(out, torch.Tensor)  # TorchScript: the core returns logits only
        return out


def _check_inputs(module: GlintModule, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    depth = module.depth_mean + module.depth_std * torch.randn(2, 1, *size, generator=g)
    return depth, torch.rand(2, 1, *size, generator=g) > 0.05


def reference_logits(module: GlintModule, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The PyTorch model's logits (the module pads to the network's stride and crops back itself)."""
    with torch.no_grad():
        return module(depth, valid)


def _diff(module: GlintModule, size: tuple[int, int], run: Any) -> float:
    """Largest |logit difference| between `run(depth, valid)` (an exported model) and the PyTorch module."""
    depth, valid = _check_inputs(module, size)
    with torch.no_grad():
        got, expected = np.asarray(run(depth, valid)), reference_logits(module, depth, valid).numpy()
    return float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")


def _info(ckpt: dict[str, Any], module: GlintModule) -> dict[str, Any]:
    """What inference needs besides the weights, and where they came from."""
    hp = ckpt["hyper_parameters"]
    return {
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "metrics": ckpt.get("metrics", {}),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model_config": hp["model"],
        "loss_config": hp.get("loss"),
        "depth_mean": float(module.depth_mean),
        "depth_std": float(module.depth_std),
        "depth_clip": module.depth_input.clip_range(),  # [low, high] mm or None (JSON has no infinities)
        "threshold": hp.get("threshold", 0.5),
        "tile_size": hp.get("tile_size"),
        "glint_lightning_version": __version__,
    }


def export_pth(ckpt: dict[str, Any], module: GlintModule, out: Path, check_size: tuple[int, int]) -> float:
    """The seed script's checkpoint layout, plus what inference needs (normalisation, threshold, model config)."""
    payload = {
        **_info(ckpt, module),
        "model_state_dict": module.model.state_dict(),
        "train_args": ckpt["hyper_parameters"].get("config") or {},
    }
    if "optimizer_states" in ckpt:
        payload["optimizer_state_dict"] = ckpt["optimizer_states"][0]
    atomic_torch_save(payload, out)
    loaded = load_pth(out)
    return _diff(module, check_size, lambda d, v: reference_logits(loaded, d, v))


def export_safetensors(ckpt: dict[str, Any], module: GlintModule, out: Path, check_size: tuple[int, int]) -> float:
    """The network's tensors as `<out>` and what they are as `<out stem>.json`; both written or neither."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in module.model.state_dict().items()}
    with atomic_output(out) as tmp, atomic_output(sidecar_path(out)) as tmp_json:
        tmp.write_bytes(save(tensors, metadata={"format": "pt"}))
        tmp_json.write_text(json.dumps({**_info(ckpt, module), "weights": out.name}, indent=1, default=str))
    loaded = load_safetensors(out)
    return _diff(module, check_size, lambda d, v: reference_logits(loaded, d, v))


def _traceable(module: GlintModule) -> tuple[nn.Module, int]:
    """The network's logits as a module for inputs padded to its stride, and that stride."""
    return _Logits(module.model.eval()), network_stride(module.model)


def export_torchscript(module: GlintModule, out: Path, check_size: tuple[int, int]) -> float:
    core, stride = _traceable(module)
    size = stride * max(2, -(-32 // stride))  # padded inputs only: the trace holds no padding logic
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-dependent branches: checked below
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation: the format is what was asked
        scripted = torch.jit.script(
            ExportedGlintModel(torch.jit.trace(core, torch.randn(1, 1, size, size)), stride, module.depth_input).eval()
        )
        with atomic_output(out) as tmp:
            scripted.save(str(tmp))
        return _diff(module, check_size, torch.jit.load(str(out)))


def export_onnx(module: GlintModule, out: Path, check_size: tuple[int, int]) -> float:
    try:
        import onnxruntime as ort
    except ImportError:
        raise GlintError("format=onnx needs onnx, onnxscript and onnxruntime: pip install '.[export]'") from None
    core, stride = _traceable(module)
    wrapper = ExportedGlintModel(core, stride, module.depth_input).eval()
    depth, valid = _check_inputs(module, (2 * stride + 3, 2 * stride + 5))
    dims = {0: torch.export.Dim("batch", max=4096), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    with atomic_output(out) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="# The axis name")  # one batch Dim shared by both inputs
        torch.onnx.export(
            wrapper,
            (depth, valid),
            str(tmp),
            dynamo=True,
            input_names=["depth", "valid"],
            output_names=["logits"],
            dynamic_shapes=(dims, dims),
            external_data=False,  # one file: external data would name the temporary file
            verbose=False,
        )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return _diff(module, check_size, lambda d, v: session.run(None, {"depth": d.numpy(), "valid": v.numpy()})[0])


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export `cfg.ckpt_path` as `cfg.format`; refuses a network that breaks the contract before writing."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise GlintError("ckpt_path is not set; e.g. glint-export ckpt_path=run/checkpoints/best.ckpt format=onnx")
    if cfg.format not in SUFFIX:
        raise GlintError(f"format={cfg.format}; use {', '.join(SUFFIX)}")
    ckpt_path = Path(cfg.ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    module = GlintModule.from_checkpoint_dict(ckpt)
    check_network(module.model, f"model._target_={ckpt['hyper_parameters']['model'].get('_target_')}")
    out = Path(cfg.out) if cfg.out else ckpt_path.with_suffix(SUFFIX[cfg.format])
    if cfg.format == "safetensors" and out.suffix != ".safetensors":
        raise GlintError(f"out={out}: name a safetensors export <name>.safetensors (its sidecar is <name>.json)")
    check_size = (int(cfg.check_size[0]), int(cfg.check_size[1]))
    if cfg.format in ("pth", "safetensors"):
        writer = export_pth if cfg.format == "pth" else export_safetensors
        diff = writer(ckpt, module, out, check_size)
    else:
        diff = (export_torchscript if cfg.format == "torchscript" else export_onnx)(module, out, check_size)
    if not diff <= MAX_DIFF:
        for written in (out, sidecar_path(out) if cfg.format == "safetensors" else out):
            written.unlink(missing_ok=True)
        raise GlintError(
            f"{out}: its logits differ from PyTorch's by {diff:.2e} on a {check_size[0]}x{check_size[1]} input, so "
            f"it was removed; the network's forward may depend on the input size in a way {cfg.format} cannot record"
        )
    return {"out": str(out), "format": cfg.format, "max_abs_diff": diff, "check_size": check_size}


@hydra_app("export")
def main(cfg: DictConfig) -> None:
    """glint-export: write a trained model as pth, torchscript, onnx or safetensors and check it against PyTorch."""
    r = export(cfg)
    sidecar = f" and {sidecar_path(r['out'])}" if r["format"] == "safetensors" else ""
    print(
        f"wrote {r['out']}{sidecar} ({r['format']}); max abs diff vs PyTorch on a {r['check_size'][0]}x"
        f"{r['check_size'][1]} input: {r['max_abs_diff']:.2e}"
    )


if __name__ == "__main__":
    main()
