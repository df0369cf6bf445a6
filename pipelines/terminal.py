"""What `tuneline run` prints: one line per progress message while the run goes, and when it fails, one short
error block that names the failed checks and steps and what was not run. Every event stays in the Dagster
instance (the UI shows them); the terminal is not a second event log."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from typing import Any

import dagster as dg

from pipelines.core.errors import TunelineError
from pipelines.quiet import quiet_libraries  # noqa: F401  (re-exported: the CLI's one import)

# Failures are summed up once at the end (error_block); their stack traces are in the UI.
_SUMMED_UP = logging.ERROR


# A progress message with a count: training steps, prompted rows. On a terminal it is one live bar per stage; in a
# file (a CI log) every quarter of the way is a line, so a run's output stays short.
_COUNTED = re.compile(r"^(?P<what>step|prompting(?: \d+-shot)?:) (?P<done>\d+)/(?P<total>\d+)(?: rows scored)?"
                      r"(?: \(\d+%\))?(?P<rest>.*)$")
_PLAIN_EVERY = 0.25  # share of a counted stage between two plain lines
_STEP_ENDS = {"STEP_SUCCESS", "STEP_FAILURE"}


class _TerminalHandler(logging.Handler):
    """`HH:MM:SS asset: message` for every progress message of a step; run-level bookkeeping is left out. Counted
    progress (step 40/268 ...) is a live bar with its figures on a terminal, and a line every quarter elsewhere."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose
        self.live = ""  # the bar now drawn on the terminal's last line
        self.shown: dict[str, float] = {}  # stage -> share of its count last printed as a plain line
        # Asked once, before the run: while a step runs, Dagster captures its output (a tee to the terminal).
        self.on_terminal = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"

    def tty(self) -> bool:
        return self.on_terminal

    def emit(self, record: logging.LogRecord) -> None:
        meta: dict[str, Any] = getattr(record, "dagster_meta", None) or {}
        event = meta.get("dagster_event")
        if event is not None and self.live and getattr(event, "event_type_value", "") in _STEP_ENDS:
            sys.stderr.write("\r\x1b[2K")  # the step is over: its bar goes (its last figures are in the UI)
            sys.stderr.flush()
            self.live = ""
        if record.levelno >= _SUMMED_UP or event is not None or not meta.get("step_key"):
            return
        step = str(meta["step_key"]).split("__", 1)[-1]
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        message = str(meta.get("orig_message", record.getMessage()))
        counted = _COUNTED.match(message)
        if counted and not self.verbose:
            done, total = int(counted["done"]), max(int(counted["total"]), 1)
            if self.tty():
                if done >= total:  # the stage's count is done: its last figures stay as a line
                    self.live = ""
                    self._line(f"\r\x1b[2K{stamp} {step}: {message}")
                else:
                    self._draw(f"{stamp} {step}: {_bar(done / total)} {done}/{total}{_first(counted['rest'])}")
                return
            stage = f"{step}/{counted['what']}"
            if done < total and done / total < self.shown.get(stage, -1.0) + _PLAIN_EVERY:
                return
            self.shown[stage] = done / total
        self._line(f"{stamp} {step}: {message}")

    def _line(self, text: str) -> None:
        """A line above the live bar, which is drawn again below it."""
        if self.live:
            sys.stderr.write("\r\x1b[2K")
        print(text, file=sys.stderr, flush=True)
        if self.live:
            sys.stderr.write(self.live)
            sys.stderr.flush()

    def _draw(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.live = text[:width]
        sys.stderr.write("\r\x1b[2K" + self.live)
        sys.stderr.flush()


def _first(rest: str) -> str:
    """The figures of a counted line with the loss and ETA first, which a narrow terminal still shows."""
    front = [m.group(0) for m in re.finditer(r"\b(?:loss|eta) \S+", rest)]
    others = re.sub(r"\s*\b(?:loss|eta) \S+", "", rest).strip()
    return "".join(f" {f}" for f in [*front, others] if f)


def _bar(share: float, width: int = 20) -> str:
    filled = share * width
    return "[" + "#" * int(filled) + ("-" * (width - int(filled))) + "]"


@dg.logger(config_schema={"log_level": dg.Field(str, default_value="INFO"),
                           "verbose": dg.Field(bool, default_value=False)},
           description="tuneline's terminal: one line per progress message (a live bar for counted progress on a "
                       "terminal), failures summed up at the end; verbose: every line, DEBUG included.")
def terminal_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    verbose = init_context.logger_config["verbose"]
    logger = logging.getLogger("tuneline.terminal")
    logger.setLevel("DEBUG" if verbose else init_context.logger_config["log_level"])
    logger.propagate = False
    for handler in [h for h in logger.handlers if isinstance(h, _TerminalHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(_TerminalHandler(verbose))
    return logger


INTERRUPTS = ("DagsterExecutionInterruptedError", "KeyboardInterrupt")


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
    if innermost.cls_name in INTERRUPTS:  # a step without the tracking wrapper (a check) stopped by a signal
        return "interrupted (SIGINT or SIGTERM)"
    message = innermost.message.strip()
    if innermost.cls_name in names:  # "pipelines.core.errors.SourceError: ..." -> "..."
        message = re.sub(rf"^[\w.]*{re.escape(innermost.cls_name)}: ", "", message, count=1)
    return message


def warning_lines(result: dg.ExecuteInProcessResult) -> list[str]:
    """The checks that failed with WARN severity: they did not block, but the user should read them."""
    return [f"warning: check {e.asset_key.to_user_string()}:{e.check_name} ({e.severity.value}): {e.description}"
            for e in result.get_asset_check_evaluations()
            if not e.passed and e.severity == dg.AssetCheckSeverity.WARN]


def error_block(result: dg.ExecuteInProcessResult, pipeline: str, planned: list[str],
                debug: bool = False, checks: bool = True) -> list[str]:
    """The failed checks (unless `checks` is False: `tuneline check` has listed them) and steps of a run, which of
    the `planned` assets did not run because of them, and where the details are; with `debug`, each failed step's
    Python traceback too (`tuneline --debug`)."""
    lines = []
    for evaluation in result.get_asset_check_evaluations() if checks else ():
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
            if debug and error is not None:
                lines += [f"  {line}" for line in error.to_string().rstrip().splitlines()]
    done = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    skipped = [name for name in planned if name not in done and name not in failed]
    if skipped:
        lines.append(f"not run, because of the failures above: {', '.join(skipped)}")
    lines.append(f"{pipeline}: Dagster run {result.run_id} failed; its events are in the Dagster UI (make ui)")
    return lines


def _figure(name: str, meta: dict[str, Any]) -> str:
    """The key figure of a data asset, from its metadata."""
    if name == "splits" and "train_rows" in meta:
        return (f"{meta['train_rows']:,} train / {meta.get('validation_rows', 0):,} validation / "
                f"{meta.get('test_rows', 0):,} test rows")
    if name == "cleaned_dataset" and "rows_kept" in meta:
        return f"{meta['rows_kept']:,} rows kept, {meta.get('rows_dropped', 0):,} dropped"
    rows = meta.get("dagster/row_count", meta.get("rows"))
    return f"{rows:,} rows" if isinstance(rows, int) else "materialized"


def check_lines(result: dg.ExecuteInProcessResult, pipeline: str) -> dict[str, Any]:
    """What `tuneline check` prints: each data asset with its key figure, each check with its verdict, and whether
    the data is ready for training (every blocking check passed); as lines and as data for --json."""
    assets: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        name = event.asset_key.path[-1]  # type: ignore[union-attr]
        meta = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
        assets[name] = {"figure": _figure(name, meta), **{k: v for k, v in meta.items() if isinstance(v, int)}}
    checks = [{"asset": e.asset_key.path[-1], "check": e.check_name, "passed": e.passed,
               "severity": e.severity.value, "description": e.description or ""}
              for e in result.get_asset_check_evaluations()]
    blocking_failed = [c for c in checks if not c["passed"] and c["severity"] == "ERROR"]
    warned = [c for c in checks if not c["passed"] and c["severity"] != "ERROR"]
    ready = result.success and not blocking_failed
    lines = [f"{pipeline}: data check (Dagster run {result.run_id})"]
    for name, info in assets.items():
        lines.append(f"  {name}: {info['figure']}")
        for c in (c for c in checks if c["asset"] == name):
            verdict = "passed" if c["passed"] else ("FAILED" if c["severity"] == "ERROR" else "warning")
            detail = "" if c["passed"] else f": {c['description']}"
            lines.append(f"    check {c['check']}: {verdict}{detail}")
    if ready:
        lines.append(f"{pipeline}: the data is ready: {sum(c['passed'] for c in checks)} of {len(checks)} checks "
                     f"passed" + (f", {len(warned)} warning(s) to read" if warned else "")
                     + f"; train it with `tuneline run --pipeline {pipeline}`")
    else:
        lines.append(f"{pipeline}: the data is NOT ready: training would be blocked")
    return {"pipeline": pipeline, "ready": ready, "assets": assets, "checks": checks, "lines": lines}
