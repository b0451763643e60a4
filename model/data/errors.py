"""The one exception type the data layer raises for bad input."""

from __future__ import annotations

__all__ = ["PerturbDataError"]


class PerturbDataError(ValueError):
    """Input data that cannot be used as it is; the message names the column or group and what to do."""
