"""Keeping the libraries' chatter (progress bars, beta warnings, migration INFO lines) out of a run's output. No
Dagster import: scripts that train without Dagster (benchmarks/) use it too."""

from __future__ import annotations

import logging
import os
import sys
import warnings


VERBOSE_VARIABLE = "TUNELINE_VERBOSE"  # set by `tuneline run --verbose`: the libraries keep their output


def quiet_libraries() -> None:
    """Warnings that say nothing about the user's data or spec (schema hints, beta APIs) stay out of the run's
    output, and so do MLflow's store-migration INFO lines and the libraries' progress bars; unless
    TUNELINE_VERBOSE=1 (`--verbose`)."""
    if os.environ.get(VERBOSE_VARIABLE) == "1":
        return
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
    dg = sys.modules.get("dagster")  # benchmarks run without Dagster; the CLI imports it before calling this
    if dg is not None:
        warnings.filterwarnings("ignore", category=dg.BetaWarning)
        warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Progress bars would interleave with the progress lines, which say the same; HF_HUB_DISABLE_PROGRESS_BARS=0
    # brings them back. transformers reads the variable when first imported; it may be imported already.
    if os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1") == "1":
        # Bars that no switch reaches (transformers' GGUF de-quantization) follow TQDM_DISABLE, which tqdm reads
        # when it is first imported.
        os.environ.setdefault("TQDM_DISABLE", "1")
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        disable_progress_bars()
        hf_logging.disable_progress_bar()
        try:  # the datasets library (TRL maps its datasets) has bars of its own
            from datasets.utils.logging import disable_progress_bar as disable_datasets_bars
        except ImportError:
            return
        disable_datasets_bars()
