"""Parameter counts and training throughput (tiles/s: forward, backward, Adam step) of each model at 64^2 and
256^2 tiles, with the ratio to the default U-Net measured in the same run.

    python -m benchmarks.model_throughput [--device cpu|cuda] [--steps 3] [--sizes 64 256]
"""

from __future__ import annotations

import argparse

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmarks.common import timed_steps
from glint_lightning.losses import DiceLoss
from glint_lightning.utils.config_dir import CONFIG_DIR

MODELS = {  # name: (config file, overrides)
    "unet (32, depth 4)": ("unet", {}),
    "unet (16, depth 3)": ("unet", {"base_channels": 16, "depth": 3}),
    "deeplabv3plus resnet50 os16": ("deeplabv3plus", {}),
    "deeplabv3plus resnet18 os16": ("deeplabv3plus", {"backbone": "resnet18"}),
    "deeplabv3plus mobilenet_v2 os16": ("deeplabv3plus", {"backbone": "mobilenet_v2"}),
    "fcn vgg16 8s": ("fcn", {}),
    "fcn resnet18 8s": ("fcn", {"backbone": "resnet18"}),
}
BATCH = {64: 16, 256: 4}


def build(group: str, overrides: dict) -> torch.nn.Module:
    cfg = OmegaConf.merge(OmegaConf.load(f"{CONFIG_DIR}/model/{group}.yaml"), overrides)
    cfg = OmegaConf.to_container(cfg)
    return instantiate(cfg)


def tiles_per_second(net: torch.nn.Module, size: int, steps: int, device: str) -> float:
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = DiceLoss()
    x = torch.randn(BATCH[size], 1, size, size, device=device)
    y = (torch.rand_like(x) < 0.03).float()
    valid = torch.ones_like(x, dtype=torch.bool)

    def step() -> None:
        out = net(x)
        loss = loss_fn(out["out"] if isinstance(out, dict) else out, y, valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return steps * BATCH[size] / timed_steps(step, steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device={args.device} threads={torch.get_num_threads()} batch={BATCH} steps={args.steps}")
    header = f"{'model':34s} {'params':>9s}" + "".join(f" {f'{s}px tiles/s':>15s} {'vs unet':>8s}" for s in args.sizes)
    print(header)
    baseline: dict[int, float] = {}
    for name, (group, overrides) in MODELS.items():
        net = build(group, overrides)
        params = sum(p.numel() for p in net.parameters())
        row = f"{name:34s} {params / 1e6:8.2f}M"
        for size in args.sizes:
            rate = tiles_per_second(net, size, args.steps, args.device)
            baseline.setdefault(size, rate)
            row += f" {rate:15.1f} {rate / baseline[size]:8.2f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
