"""Batch scoring: new, unlabelled files read as rows, checked, answered by a registered model version and written
beside their source as Parquet, each row with the prediction, its score and the version that produced it.

Rows that cannot be scored (no text column in their file, an empty text, a text that looks like an id) are kept
with the reason in `not_scored_because`, never dropped. Pure library: the assets (assets/scoring.py) call these.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.core.digests import combined_digest, frame_digest, sha256_file
from pipelines.core.markdown import markdown_table
from pipelines.core.errors import SourceError
from pipelines.core.files import atomic_path
from pipelines.core.quality import ERROR, QualityReport, check_def, evaluate_checks, with_row_id
from pipelines.core.records import DatasetLog, Markdown, StepLog
from pipelines.core.sections import ScoringConfig
from pipelines.core.sources import READ_EXTENSIONS, read_file
from pipelines.core.tasks.base import Predictor, ServingSchema
from pipelines.core.training.compute import ProgressFn

INCOMING_CHECKS = ("incoming_files_have_the_column", "incoming_rows_are_scorable")
DESCRIPTIONS = {
    "incoming_files_have_the_column": "Every incoming file has the spec's scoring.column.",
    "incoming_rows_are_scorable": "At most scoring.max_unscorable_fraction of the incoming rows have no text or a "
                                  "text that looks like an id (those rows are listed in the output, never dropped).",
}
# No letters, or one ASCII token with a digit (42, TCK-00123): an id, not a text a model can answer.
ID_LIKE = re.compile(r"^(?:[\W\d_]*|[\x21-\x7e]*\d[\x21-\x7e]*)$")
NO_COLUMN, EMPTY, ID = "its file has no text column", "empty text", "looks like an id, not a text"
SCORED_SUFFIX = ".scored.parquet"
EXAMPLE_COLUMNS = ("text", "not_scored_because", "source_file", "source_row")


def incoming_files(cfg: ScoringConfig, project_root: Path) -> list[Path]:
    """The data files in the incoming folder (by extension, hidden and temporary files left out), sorted."""
    folder = _folder(cfg.incoming, project_root)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in READ_EXTENSIONS)


def _folder(path: str, project_root: Path) -> Path:
    folder = Path(path)
    return folder if folder.is_absolute() else project_root / folder


def _why_not(text: Any, has_column: bool) -> str | None:
    if not has_column:
        return NO_COLUMN
    if not isinstance(text, str) or not text.strip():
        return EMPTY
    return ID if ID_LIKE.match(text.strip()) else None


def read_incoming(cfg: ScoringConfig, project_root: Path, pipeline: str) -> tuple[pd.DataFrame, StepLog]:
    """Every incoming file's rows: their own columns, `text` (from scoring.column), the file (as given, relative
    to the project root where it lies inside it) and row, the file's sha256, and why a row cannot be scored."""
    frames, files = [], []
    for path in incoming_files(cfg, project_root):
        frame, sha = read_file(path, "auto")
        shown = str(path.relative_to(project_root)) if path.is_relative_to(project_root) else str(path)
        has_column = cfg.column in frame.columns
        texts = frame[cfg.column] if has_column else pd.Series([None] * len(frame), index=frame.index)
        # object columns: pandas' string dtype would turn the None of "nothing wrong" into NaN
        frame = frame.assign(source_file=shown, source_sha256=sha,
                             text=pd.Series([t if isinstance(t, str) else None for t in texts], index=frame.index,
                                            dtype=object),
                             not_scored_because=pd.Series([_why_not(t, has_column) for t in texts],
                                                          index=frame.index, dtype=object))
        frames.append(frame)
        files.append({"file": shown, "sha256": sha, "rows": len(frame), "has_column": has_column})
    columns = ["source_file", "source_row", "source_sha256", "text", "not_scored_because"]
    rows = (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in columns}, dtype=object))
    unscorable = int(rows["not_scored_because"].notna().sum())
    digest = frame_digest(rows)
    message = (f"{len(rows)} rows in {len(files)} file(s) of {cfg.incoming}; {unscorable} cannot be scored"
               if files else f"no files to score in {cfg.incoming} yet")
    return rows, StepLog(
        data_version=digest[:32], message=message,
        metadata={"dagster/row_count": len(rows), "incoming": cfg.incoming, "incoming_files": files,
                  "unscorable_rows": unscorable, "sha256": digest},
        metrics={"rows": len(rows), "files": len(files), "unscorable_rows": unscorable},
        datasets=(DatasetLog(rows, f"{pipeline}/incoming_data", digest, "incoming", cfg.incoming),)
        if len(rows) else ())


def validate_incoming(rows: pd.DataFrame, cfg: ScoringConfig) -> QualityReport:
    """The blocking checks of incoming_data."""
    import great_expectations.expectations as gxe

    table = with_row_id(rows).assign(file_has_column=lambda t: t["not_scored_because"] != NO_COLUMN)
    checks = [
        check_def("incoming_files_have_the_column", DESCRIPTIONS["incoming_files_have_the_column"],
                  f"add the column {cfg.column!r} to the files shown, or set scoring.column to the column "
                  "that holds the text",
                  (gxe.ExpectColumnValuesToBeInSet(column="file_has_column", value_set=[True]), "rows", ERROR)),
        check_def("incoming_rows_are_scorable", DESCRIPTIONS["incoming_rows_are_scorable"],
                  "fix the rows shown at their source (an empty cell, an id instead of a text), or raise "
                  "scoring.max_unscorable_fraction",
                  (gxe.ExpectColumnValuesToBeNull(column="not_scored_because", mostly=1 - cfg.max_unscorable_fraction)
                   if cfg.max_unscorable_fraction < 1 else
                   gxe.ExpectColumnToExist(column="not_scored_because"), "rows", ERROR)),
    ]
    return evaluate_checks("incoming_data", checks, {"rows": table}, EXAMPLE_COLUMNS)


def score_rows(rows: pd.DataFrame, answer: Predictor, serving: ServingSchema, model_version: str, batch_size: int,
               progress: ProgressFn = print) -> tuple[pd.DataFrame, float]:
    """The rows with `prediction`, `score` and `model_version` (null where a row cannot be scored), and the scoring
    seconds. A retrieval model's answer is its top document."""
    # Longest texts first, in batches of similar length: little padding, and the slowest batch is seen at once.
    scorable = sorted(rows.index[rows["not_scored_because"].isna()], key=lambda i: -len(rows.at[i, "text"]))
    predictions: dict[Any, Any] = {}
    scores: dict[Any, Any] = {}
    started, reported = time.perf_counter(), 0.0
    for start in range(0, len(scorable), batch_size):
        batch = scorable[start:start + batch_size]
        answers = answer([rows.at[i, "text"] for i in batch], 64)
        if serving.rows_per_input != "one":  # top-k rows per text: the first is the answer
            answers = [a for a in answers if a.get("rank", 1) == 1]
        for i, row in zip(batch, answers, strict=True):
            predictions[i] = row[serving.prediction]
            scores[i] = row[serving.score] if serving.score else None
        done = start + len(batch)
        if time.perf_counter() - reported > 10 or done == len(scorable):
            reported = time.perf_counter()
            progress(f"scored {done:,} of {len(scorable):,} rows")
    seconds = time.perf_counter() - started
    out = rows.copy()
    out["prediction"] = pd.Series([predictions.get(i) for i in rows.index], index=rows.index, dtype=object)
    out["score"] = pd.Series([scores.get(i) for i in rows.index], index=rows.index, dtype="float64")
    out["model_version"] = pd.Series([model_version if i in predictions else None for i in rows.index],
                                     index=rows.index, dtype=object)
    return out, seconds


def write_scored(scored: pd.DataFrame, output: str, project_root: Path) -> list[dict[str, Any]]:
    """One Parquet file per source file in the output folder (through a temporary sibling, then renamed); what was
    written, per file."""
    folder = _folder(output, project_root)
    written = []
    for source, part in scored.groupby("source_file", sort=True):
        target = folder / (Path(str(source)).name + SCORED_SUFFIX)
        with atomic_path(target) as tmp:
            part.drop(columns=["source_file"]).assign(source_file=source).to_parquet(tmp, index=False)
        shown = str(target.relative_to(project_root)) if target.is_relative_to(project_root) else str(target)
        written.append({"file": str(source), "sha256": str(part["source_sha256"].iat[0]), "rows": len(part),
                        "scored": int(part["model_version"].notna().sum()),
                        "not_scored": int(part["model_version"].isna().sum()), "output": shown,
                        "output_sha256": sha256_file(target)})
    return written


def scoring_log(scored: pd.DataFrame, written: list[dict[str, Any]], model_version: str, seconds: float) -> StepLog:
    """What scored_data records: the version, the files with their digests and outputs, the rows that were not
    scored and why, and the speed."""
    done = int(scored["model_version"].notna().sum())
    reasons = {str(k): int(v) for k, v in scored["not_scored_because"].value_counts().items()}
    skipped = scored[scored["not_scored_because"].notna()].head(20)
    digest = combined_digest([(w["output"], w["output_sha256"]) for w in written])
    rate = round(done / seconds, 1) if seconds > 0 else 0.0
    return StepLog(
        data_version=digest[:32],
        message=f"scored {done:,} of {len(scored):,} rows in {len(written)} file(s) with model version "
                f"{model_version}" + (f" ({rate:,.0f} rows/s)" if rate else ""),
        params={"model_version": model_version},
        metrics={"rows": len(scored), "scored_rows": done, "unscored_rows": len(scored) - done,
                 "rows_per_second": rate},
        metadata={"dagster/row_count": len(scored), "model_version": model_version, "scored_files": written,
                  "not_scored_reasons": reasons, "rows_per_second": rate, "sha256": digest,
                  "files": Markdown(markdown_table(["file", "rows", "scored", "not scored", "output"],
                                                   [[w["file"], w["rows"], w["scored"], w["not_scored"], w["output"]]
                                                    for w in written])),
                  "rows_not_scored": Markdown(markdown_table(["file", "row", "why"], [
                      [r.source_file, r.source_row, r.not_scored_because] for r in skipped.itertuples(index=False)])
                      if len(skipped) else "every row was scored")})


def require_rows(rows: pd.DataFrame, cfg: ScoringConfig) -> None:
    if "not_scored_because" not in rows.columns:
        raise SourceError(f"incoming_data has no not_scored_because column; materialize it again from "
                          f"{cfg.incoming}")


def sensor_fingerprint(cfg: ScoringConfig, project_root: Path, champion: str | None,
                       digest: Callable[[Path], str] = sha256_file) -> str | None:
    """What the scoring sensor compares between ticks: the incoming files' names and digests and the champion's
    version; None while the folder holds no files."""
    files = incoming_files(cfg, project_root)
    if not files:
        return None
    import hashlib

    text = "\n".join(f"{p.name}\t{digest(p)}" for p in files) + f"\nchampion\t{champion}"
    return hashlib.sha256(text.encode()).hexdigest()
