"""The error for a model option a network cannot take (`model.init=he`): a GlintError, so the user gets one line
and exit 2 even from inside Hydra's instantiate, and a ValueError, as these were before (callers catching
ValueError keep working)."""

from __future__ import annotations

from glint_lightning.utils.errors import OptionError


class ModelOptionError(OptionError):
    """A model option outside what the network supports; the message names the option and the choices."""
