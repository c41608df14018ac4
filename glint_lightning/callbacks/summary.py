"""The model summary at the start of training: parameters per part, without Lightning's FLOPs column.

Lightning counts FLOPs only by running `example_input_array` through the module; ours takes (depth, valid) and
sets none, so its summary showed a column of zeros and `Total FLOPs: 0`. This one leaves FLOPs out and logs a
plain table (to the console and train.log, as Lightning's own log lines) instead of a Rich table on stdout.
Configured as `callbacks.model_summary` (`max_depth=0` or `~callbacks.model_summary` turns it off).
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger("lightning.pytorch.callbacks.model_summary")

LEFT_OUT = ("FLOPs",)


def format_summary(
    columns: list[tuple[str, list[str]]],
    total_parameters: int,
    trainable_parameters: int,
    model_size: float,
) -> str:
    """A text table of `columns` (header, cells), minus LEFT_OUT, then the parameter totals."""
    columns = [(head, [str(c) for c in cells]) for head, cells in columns if head not in LEFT_OUT]
    widths = [max([len(head), *(len(c) for c in cells)]) for head, cells in columns]
    rows = [[head for head, _ in columns], *zip(*(cells for _, cells in columns), strict=True)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    rule = "-" * max(len(line) for line in lines)
    totals = [
        (get_human_readable_count(trainable_parameters), "Trainable params"),
        (get_human_readable_count(total_parameters - trainable_parameters), "Non-trainable params"),
        (get_human_readable_count(total_parameters), "Total params"),
        (f"{model_size:,.3f}", "Total estimated model params size (MB)"),
    ]
    return "\n".join([lines[0], rule, *lines[1:], rule, *(f"{n:<10}{label}" for n, label in totals)])


class ParameterSummary(ModelSummary):
    """Lightning's ModelSummary callback (`max_depth` levels of submodules) printed without FLOPs."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        log.info("\n" + format_summary(summary_data, total_parameters, trainable_parameters, model_size))
