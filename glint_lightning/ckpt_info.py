"""`python -m glint_lightning.ckpt_info path.ckpt [--json]`: what a checkpoint holds, without a GPU or the data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glint_lightning.checkpoints.reader import load_checkpoint
from glint_lightning.utils.errors import ArgumentParser, exit_on_user_error


def describe(path: str | Path) -> dict[str, Any]:
    """Epoch, step, metrics, threshold, optimizer state, model/loss config and size, as plain data."""
    path = Path(path)
    ckpt = load_checkpoint(path)  # weights_only=True, map_location="cpu": GPU-saved files load on CPU machines
    hp = ckpt.get("hyper_parameters") or {}
    best = {
        state["monitor"]: state.get("best_model_score")
        for key, state in (ckpt.get("callbacks") or {}).items()
        if key.startswith("ModelCheckpoint") and state.get("monitor")
    }
    n_params = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("model.") and v.is_floating_point())
    return {
        "path": str(path),
        "size_mb": round(path.stat().st_size / 2**20, 2),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "has_optimizer_state": "optimizer_states" in ckpt,
        "threshold": hp.get("threshold"),
        "threshold_calibration": ckpt.get("threshold_calibration"),
        "threshold_from_these_weights": _calibrated_here(ckpt),
        "postprocess": (ckpt.get("threshold_calibration") or {}).get("postprocess"),  # glint-eval calibrate=true
        "metrics": ckpt.get("metrics", {}),
        "best": {k: (float(v) if v is not None else None) for k, v in best.items()},
        "model": hp.get("model"),
        "loss": hp.get("loss"),
        "parameters": n_params,
        "glint_lightning_version": ckpt.get("glint_lightning_version"),
    }


def _calibrated_here(ckpt: dict[str, Any]) -> bool | None:
    """Whether the stored threshold was calibrated with this checkpoint's weights (same epoch and step); None when
    no threshold was calibrated or the calibration does not record its weights (written before it did)."""
    weights = (ckpt.get("threshold_calibration") or {}).get("weights")
    if not weights:
        return None
    return (weights.get("epoch"), weights.get("global_step")) == (ckpt.get("epoch"), ckpt.get("global_step"))


def _calibration(info: dict[str, Any]) -> str:
    """(calibrated with these weights: val F1 0.8277), or with which other weights, e.g. last.ckpt's threshold
    comes from the best checkpoint's weights."""
    cal = info["threshold_calibration"]
    if not cal:
        return ""
    f1, weights, here = f"val F1 {cal['val_f1']:.4f}", cal.get("weights") or {}, info["threshold_from_these_weights"]
    if here is None:
        return f" (calibrated: {f1}; with which weights was not recorded)"
    if here:
        return f" (calibrated with these weights: {f1})"
    which = "the best weights" if weights.get("role") == "best" else "other weights"
    return f" (calibrated with {which}, {weights.get('checkpoint')} at epoch {weights.get('epoch')}, not these: {f1})"


def _postprocess(info: dict[str, Any]) -> str:
    """min_size / fill_holes as eval and predict use them, and how they were chosen; `off` when none is stored."""
    post = info.get("postprocess")
    if not post:
        return "off (none chosen: glint-eval calibrate=true or glint-train calibrate_postprocess=true chooses it)"
    min_size, fill = int(post.get("min_size") or 0), bool(post.get("fill_holes"))
    chosen = ", ".join([f"min_size={min_size} px"] * (min_size > 1) + ["fill_holes"] * fill) or "off"
    if "score" not in post:
        return chosen
    metric, tiles, without = post.get("metric"), post.get("tiles"), post.get("score_without", float("nan"))
    if chosen == "off":
        return f"off (none beat no post-processing on {tiles} val tiles: {metric} {without:.4f})"
    return f"{chosen} (chosen on {tiles} val tiles: {metric} {post['score']:.4f}, {without:.4f} without)"


def format_info(info: dict[str, Any]) -> str:
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(info["metrics"].items()) if not k.endswith("_step"))
    return "\n".join(
        [
            f"checkpoint:      {info['path']} ({info['size_mb']} MB)",
            f"epoch / step:    {info['epoch']} / {info['global_step']}",
            f"optimizer state: {'yes' if info['has_optimizer_state'] else 'no (weights-only resume)'}",
            f"threshold:       {info['threshold']}{_calibration(info)}",
            f"post-processing: {_postprocess(info)}",
            f"best:            {info['best']}",
            f"metrics:         {metrics or '-'}",
            f"model:           {info['model']} ({info['parameters'] / 1e6:.2f}M parameters)",
            f"loss:            {info['loss']}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """glint-ckpt-info (the console script calls this, not the `__main__` block): bad input is one line, exit 2."""
    parser = ArgumentParser(prog="glint-ckpt-info", description=__doc__)
    parser.add_argument("path", help="a .ckpt written by glint_lightning.train")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        info = describe(args.path)
    print(json.dumps(info, indent=1) if args.json else format_info(info))


if __name__ == "__main__":
    main()
