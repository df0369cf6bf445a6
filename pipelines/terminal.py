"""What `tuneline run` prints: one line per progress message while the run goes, and when it fails, one short
error block that names the failed checks and steps and what was not run. Every event stays in the Dagster
instance (the UI shows them); the terminal is not a second event log."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import dagster as dg

from pipelines.core.errors import TunelineError
from pipelines.quiet import quiet_libraries  # noqa: F401  (re-exported: the CLI's one import)

# Failures are summed up once at the end (error_block); their stack traces are in the UI.
_SUMMED_UP = logging.ERROR


class _TerminalHandler(logging.Handler):
    """`HH:MM:SS asset: message` for every progress message of a step; run-level bookkeeping is left out."""

    def emit(self, record: logging.LogRecord) -> None:
        meta: dict[str, Any] = getattr(record, "dagster_meta", None) or {}
        if record.levelno >= _SUMMED_UP or meta.get("dagster_event") is not None or not meta.get("step_key"):
            return
        step = str(meta["step_key"]).split("__", 1)[-1]
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        print(f"{stamp} {step}: {meta.get('orig_message', record.getMessage())}", file=sys.stderr, flush=True)


@dg.logger(config_schema={"log_level": dg.Field(str, default_value="INFO")},
           description="tuneline's terminal: one line per progress message, failures summed up at the end.")
def terminal_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.getLogger("tuneline.terminal")
    logger.setLevel(init_context.logger_config["log_level"])
    logger.propagate = False
    if not any(isinstance(h, _TerminalHandler) for h in logger.handlers):
        logger.addHandler(_TerminalHandler())
    return logger


def _user_message(error: Any) -> str:
    """The error a user can act on: the outermost tuneline error in the chain (it says what to do; its causes
    are details), else the innermost error (the user's, not Dagster's wrapper); without tuneline's module path."""
    names, stack = set(), [TunelineError]
    while stack:
        cls = stack.pop()
        names.add(cls.__name__)
        stack.extend(cls.__subclasses__())
    innermost = error
    while error is not None:
        if error.cls_name in names:
            innermost = error
            break
        innermost, error = error, error.cause
    if innermost is None:
        return "unknown error"
    message = innermost.message.strip()
    if innermost.cls_name in names:  # "pipelines.core.errors.SourceError: ..." -> "..."
        message = re.sub(rf"^[\w.]*{re.escape(innermost.cls_name)}: ", "", message, count=1)
    return message


def warning_lines(result: dg.ExecuteInProcessResult) -> list[str]:
    """The checks that failed with WARN severity: they did not block, but the user should read them."""
    return [f"warning: check {e.asset_key.to_user_string()}:{e.check_name} ({e.severity.value}): {e.description}"
            for e in result.get_asset_check_evaluations()
            if not e.passed and e.severity == dg.AssetCheckSeverity.WARN]


def error_block(result: dg.ExecuteInProcessResult, pipeline: str, planned: list[str]) -> list[str]:
    """The failed checks and steps of a run, which of the `planned` assets did not run because of them, and
    where the details are."""
    lines = []
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR:
            lines.append(f"error: check {evaluation.asset_key.to_user_string()}:{evaluation.check_name} failed "
                         f"({evaluation.severity.value}): {evaluation.description}")
    failed = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            step = (event.step_key or "").split("__", 1)[-1]
            failed.append(step)
            error = event.event_specific_data.error  # type: ignore[union-attr]
            if error is not None and error.cls_name == "DagsterAssetCheckFailedError":
                continue  # the failed checks are listed above, each with what to fix
            lines.append(f"error: step {step} failed: {_user_message(error)}")
    done = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    skipped = [name for name in planned if name not in done and name not in failed]
    if skipped:
        lines.append(f"not run, because of the failures above: {', '.join(skipped)}")
    lines.append(f"{pipeline}: Dagster run {result.run_id} failed; its events are in the Dagster UI (make ui)")
    return lines
