"""The library's loggers: what it reports (resuming, schedules, pretrained weights, locks) goes through `logging`,
once per job (rank zero only under DDP), so Hydra's handlers put it on the console and in train.log. Entry points'
final summaries print."""

from __future__ import annotations

import logging
import sys

logging.getLogger("glint_lightning").setLevel(logging.INFO)  # the INFO lines reach Hydra's (or the user's) handlers


class _RankZero(logging.Filter):
    """Lightning's rank where Lightning runs; without it (tools such as glint-check, which need not pay for importing
    torch and Lightning) there is one process, rank zero."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
        return rank_zero is None or getattr(rank_zero.rank_zero_only, "rank", 0) == 0


_RANK_ZERO = _RankZero()


def get_logger(name: str) -> logging.Logger:
    """`logging.getLogger(name)` that drops records on ranks other than zero."""
    logger = logging.getLogger(name)
    if _RANK_ZERO not in logger.filters:
        logger.addFilter(_RANK_ZERO)
    return logger
