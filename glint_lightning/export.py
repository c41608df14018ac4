"""`python -m glint_lightning.export ckpt_path=run/checkpoints/best.ckpt format=pth|torchscript|onnx [out=...]`

Hands a trained model to people without this framework. `pth` is the old script's dict (`model_state_dict`
loads into the network); `torchscript` and `onnx` take depth in mm and validity, any batch size and any H, W
(normalisation, padding and cropping are inside), and are checked against the PyTorch model after export.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn

from glint_lightning.checkpoint_io import atomic_output, atomic_torch_save
from glint_lightning.errors import GlintError, exit_on_user_error, parse_options
from glint_lightning.models.common import pad_to_multiple
from glint_lightning.module import GlintModule
from glint_lightning.resume import load_checkpoint

DEFAULTS: dict[str, Any] = {"ckpt_path": None, "format": "pth", "out": None, "check_size": [97, 131]}
SUFFIX = {"pth": ".pth", "torchscript": ".pt", "onnx": ".onnx"}


class _Padded(nn.Module):
    """The network's forward_padded as a module (inputs already padded to its stride)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_padded(x)


class ExportedGlintModel(nn.Module):
    """depth (B, 1, H, W) in mm and valid (B, 1, H, W) bool -> logits (B, 1, H, W), for any B, H, W."""

    def __init__(self, core: nn.Module, stride: int, mean: float, std: float) -> None:
        super().__init__()
        self.core, self.stride, self.mean, self.std = core, stride, mean, std

    def forward(self, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h, w = depth.shape[-2], depth.shape[-1]
        x = (depth - self.mean) / self.std
        x = torch.where(valid, x, torch.zeros_like(x))
        return self.core(pad_to_multiple(x, self.stride))[:, :, :h, :w]


def _check_inputs(module: GlintModule, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    depth = module.depth_mean + module.depth_std * torch.randn(2, 1, *size, generator=g)
    return depth, torch.rand(2, 1, *size, generator=g) > 0.05


def export_pth(ckpt: dict[str, Any], module: GlintModule, out: Path, check_size: tuple[int, int]) -> float:
    """The seed script's checkpoint layout, plus what inference needs (normalisation, threshold, model config)."""
    hp = ckpt["hyper_parameters"]
    payload = {
        "epoch": ckpt.get("epoch"),
        "model_state_dict": module.model.state_dict(),
        "train_args": hp.get("config") or {},
        "metrics": ckpt.get("metrics", {}),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model_config": hp["model"],
        "depth_mean": float(module.depth_mean),
        "depth_std": float(module.depth_std),
        "threshold": hp.get("threshold", 0.5),
    }
    if "optimizer_states" in ckpt:
        payload["optimizer_state_dict"] = ckpt["optimizer_states"][0]
    atomic_torch_save(payload, out)
    loaded = torch.load(out, map_location="cpu", weights_only=True)
    model_cfg = {k: v for k, v in loaded["model_config"].items() if k not in ("freeze", "unfreeze_at_epoch")}
    net = instantiate({**model_cfg, "pretrained": None} if "pretrained" in model_cfg else model_cfg).eval()
    net.load_state_dict(loaded["model_state_dict"])
    x = torch.randn(1, 1, *check_size)
    with torch.no_grad():
        return float((net(x) - module.model.eval()(x)).abs().max())


def export_torchscript(module: GlintModule, out: Path, check_size: tuple[int, int]) -> float:
    net = module.model.eval()
    example = torch.randn(1, 1, 2 * net.stride, 2 * net.stride)
    with torch.no_grad():
        core = torch.jit.trace(_Padded(net), example)  # no shape logic inside: valid for any padded size
    scripted = torch.jit.script(
        ExportedGlintModel(core, int(net.stride), float(module.depth_mean), float(module.depth_std))
    )
    with atomic_output(out) as tmp:
        scripted.save(str(tmp))
    loaded = torch.jit.load(str(out))
    depth, valid = _check_inputs(module, check_size)
    with torch.no_grad():
        return float((loaded(depth, valid) - module(depth, valid)).abs().max())


def export_onnx(module: GlintModule, out: Path, check_size: tuple[int, int]) -> float:
    try:
        import onnxruntime as ort
    except ImportError:
        raise GlintError("format=onnx needs onnx, onnxscript and onnxruntime: pip install '.[export]'") from None
    net = module.model.eval()
    wrapper = ExportedGlintModel(_Padded(net), int(net.stride), float(module.depth_mean), float(module.depth_std))
    depth, valid = _check_inputs(module, (2 * net.stride + 3, 2 * net.stride + 5))
    dims = {0: torch.export.Dim("batch", max=4096), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    with atomic_output(out) as tmp:
        torch.onnx.export(
            wrapper,
            (depth, valid),
            str(tmp),
            dynamo=True,
            input_names=["depth", "valid"],
            output_names=["logits"],
            dynamic_shapes=(dims, dims),
            verbose=False,
        )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    depth, valid = _check_inputs(module, check_size)
    (logits,) = session.run(None, {"depth": depth.numpy(), "valid": valid.numpy()})
    with torch.no_grad():
        return float(np.abs(logits - module(depth, valid).numpy()).max())


def export(args: Any) -> dict[str, Any]:
    if not args.ckpt_path:
        raise GlintError(f"ckpt_path is not set; usage: {__doc__.strip().splitlines()[0]}")
    if args.format not in SUFFIX:
        raise GlintError(f"format={args.format}; use pth, torchscript or onnx")
    ckpt_path = Path(args.ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    module = GlintModule.from_checkpoint_dict(ckpt)
    out = Path(args.out) if args.out else ckpt_path.with_suffix(SUFFIX[args.format])
    check_size = tuple(int(v) for v in args.check_size)
    if args.format == "pth":
        diff = export_pth(ckpt, module, out, check_size)
    elif args.format == "torchscript":
        diff = export_torchscript(module, out, check_size)
    else:
        diff = export_onnx(module, out, check_size)
    return {"out": str(out), "format": args.format, "max_abs_diff": diff, "check_size": check_size}


def main(argv: list[str]) -> None:
    args = parse_options("export", DEFAULTS, argv)
    r = export(args)
    print(
        f"wrote {r['out']} ({r['format']}); max abs diff vs PyTorch on a {r['check_size'][0]}x{r['check_size'][1]} "
        f"input: {r['max_abs_diff']:.2e}"
    )


if __name__ == "__main__":
    with exit_on_user_error():
        main(sys.argv[1:])
