"""glint-lightning: segment glints in single-channel depth images with Lightning + Hydra."""

import logging
import warnings

__version__ = "0.1.0"

# Lightning lines that say nothing about the run, dropped wherever they are logged: an advertisement printed at
# every Trainer start, and the note that our own ModelSummary (callbacks.model_summary) replaces Lightning's.
QUIET_LIGHTNING_LINES = (
    "try installing [litlogger]",
    "Skipping setting a default `ModelSummary` callback",
)


class _QuietLightning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in QUIET_LIGHTNING_LINES)


# Lightning's rank_zero_info logs through whichever of these two its last import installed.
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_QuietLightning())

# Recent torch deprecates LeafSpec, which Lightning's pytree helper (2.6) still builds: one FutureWarning per run.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
