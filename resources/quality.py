"""The Great Expectations environment of the quality checks: offline and quiet. Set before GX is imported."""

from __future__ import annotations

import logging
import os


def prepare_great_expectations() -> None:
    """Switch off GX's usage statistics (it would try to reach its service; tuneline runs offline) and its
    chatty INFO lines (the checks report their results themselves)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.WARNING)
