"""What every task's evaluation shares: the promotion rule, the report record's assembly, and its one
Markdown and one HTML rendering."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.core.files import write_bytes_atomic
from pipelines.core.markdown import format_cell, markdown_table
from pipelines.core.records import CheckpointRecord, EvaluationReport, Promotion, ReportTable


# Baselines that need no training besides prompting: the base model as it is, the model a pipeline started from.
UNTRAINED = ("base_model", "starting_model")


def decide_promotion(candidate: dict[str, float], champion: dict[str, float] | None,
                     baselines: dict[str, dict[str, float]], primary: str, min_improvement: float,
                     candidate_version: str | None, champion_version: str | None) -> Promotion:
    """Whether the candidate becomes champion, and why, in words a person can check."""
    value = candidate[primary]
    if candidate_version is not None and candidate_version == champion_version:
        return Promotion(False, f"v{candidate_version} is already the champion", primary, candidate_version,
                         champion_version)
    if champion is None:
        beaten = [b for b, m in baselines.items() if value > m[primary]]
        missed = [b for b in baselines if b not in beaten]
        promote = not missed
        reason = (f"first model: {primary} {value:.4f} beats every baseline ({', '.join(beaten) or 'none'})"
                  if promote else f"first model but not promoted: {primary} {value:.4f} does not beat "
                                  f"{', '.join(missed)}")
    elif missed := [b for b, m in baselines.items() if not value > m[primary]]:
        # A champion beats every baseline: a candidate better than a weak champion but not than a baseline that
        # needs no training is not one.
        promote = False
        reason = (f"not promoted: {primary} {value:.4f} does not beat {', '.join(missed)} (a champion beats every "
                  "baseline)")
    else:
        gain = value - champion[primary]
        promote = gain >= min_improvement
        verdict = "promoted" if promote else "not promoted"
        reason = (f"{verdict}: {primary} {value:.4f} vs champion v{champion_version} {champion[primary]:.4f} on "
                  "the same test split, a change of "
                  f"{gain:+.4f} (needs at least +{min_improvement:g}, promotion.min_improvement)")
    return Promotion(promote, reason, primary, candidate_version, champion_version)


def champion_metrics(champion: CheckpointRecord | None, checkpoint: CheckpointRecord, metrics: dict[str, float],
                     score: Callable[[CheckpointRecord], dict[str, float]],
                     progress: Callable[[str], None]) -> dict[str, float] | None:
    """The current champion's metrics on the same test data: None without a champion, the candidate's own when
    it is the champion already, else `score(champion)`."""
    if champion is None:
        return None
    if champion.model_version == checkpoint.model_version:
        return metrics
    progress(f"evaluating the champion v{champion.model_version} on the same test split")
    return score(champion)


def build_report(*, pipeline: str, task: str, checkpoint: CheckpointRecord, test_rows: int, headline: str,
                 metric_names: Sequence[str], metrics: dict[str, float], baselines: dict[str, dict[str, float]],
                 champion: CheckpointRecord | None, champion_scores: dict[str, float] | None, primary: str,
                 min_improvement: float, out_dir: Path, tables: Sequence[ReportTable] = (),
                 images: Sequence[tuple[str, str]] = (), details: dict[str, Any] | None = None,
                 files: dict[str, str] | None = None) -> EvaluationReport:
    """Decide the promotion, assemble the report and write it as JSON and HTML into `out_dir`."""
    beats = {name: metrics[primary] > m[primary] for name, m in baselines.items()}
    promotion = decide_promotion(metrics, champion_scores, baselines, primary, min_improvement,
                                 checkpoint.model_version, champion.model_version if champion else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = EvaluationReport(
        pipeline=pipeline, task=task, checkpoint_sha256=checkpoint.sha256, test_rows=test_rows,
        metric_names=tuple(metric_names), metrics=metrics, baselines=baselines, primary_metric=primary,
        beats_baselines=beats, promotion=promotion, champion_metrics=champion_scores, headline=headline,
        tables=tuple(tables), images=tuple(images), details=details or {},
        verdict=fine_tuning_verdict(metrics, baselines, primary, min_improvement, checkpoint),
        files={**(files or {}), "report_json": str(out_dir / "report.json"),
               "report_html": str(out_dir / "report.html")})
    return write_report(report)


def fine_tuning_verdict(metrics: dict[str, float], baselines: dict[str, dict[str, float]], primary: str,
                        min_improvement: float, checkpoint: CheckpointRecord) -> str:
    """One sentence: whether fine-tuning beat the best baseline that needs no training (prompting, or the base
    model as it is) by more than promotion.min_improvement, and what the training cost."""
    untrained = {name: m[primary] for name, m in baselines.items()
                 if (name.startswith("prompt_") or name in UNTRAINED) and primary in m and m[primary] == m[primary]}
    if not untrained:
        return ""
    name = max(untrained, key=lambda n: untrained[n])
    gain = metrics[primary] - untrained[name]
    cost = (f"{checkpoint.train_seconds / 60:.1f} min of training and {checkpoint.trainable_parameters:,} trainable "
            f"parameters")
    if gain > min_improvement:
        return (f"Fine-tuning paid off: {primary} {metrics[primary]:.4f} against {untrained[name]:.4f} for the best "
                f"baseline without training ({name.replace('_', ' ')}), for {cost}.")
    return (f"Fine-tuning did not pay off: {primary} {metrics[primary]:.4f} against {untrained[name]:.4f} for "
            f"{name.replace('_', ' ')} with no training at all; {cost} bought {gain:+.4f}.")


def write_report(report: EvaluationReport) -> EvaluationReport:
    """Write the report as report.json and report.html (each through a temporary file)."""
    write_bytes_atomic(Path(report.json_path), json.dumps(report.to_dict(), indent=2, default=str).encode())
    write_bytes_atomic(Path(report.html_path), report_html(report).encode())
    return report


# ------------------------------------------------------------------------------------------ rendering
def _columns(report: EvaluationReport) -> dict[str, dict[str, float]]:
    """The models compared, in order: the fine-tuned one, each baseline, then the champion."""
    columns = {"fine-tuned": report.metrics, **{b.replace("_", " "): m for b, m in report.baselines.items()}}
    if report.champion_metrics is not None:
        columns[f"champion v{report.promotion.champion_version}"] = report.champion_metrics
    return columns


def _verdicts(report: EvaluationReport) -> str:
    return ", ".join(f"{'beats' if won else 'does NOT beat'} the {name.replace('_', ' ')}"
                     for name, won in report.beats_baselines.items())


def _metric_rows(report: EvaluationReport) -> tuple[list[str], list[list[Any]]]:
    columns = _columns(report)
    return (["metric", *columns],
            [[name, *(m.get(name, math.nan) for m in columns.values())] for name in report.metric_names])


def report_markdown(report: EvaluationReport) -> str:
    """The report as Markdown for the Dagster UI: every model's metrics, the promotion, the task's tables."""
    header, rows = _metric_rows(report)
    sections = "".join(f"\n\n**{t.title}**\n\n{markdown_table(t.header, t.rows)}" for t in report.tables)
    return (f"**{report.pipeline}** on {report.headline} — on {report.primary_metric} the fine-tuned model "
            f"{_verdicts(report)}.\n\n" + (f"**{report.verdict}**\n\n" if report.verdict else "") +
            f"**Promotion:** {report.promotion.reason}\n\n"
            f"{markdown_table(header, rows)}{sections}")


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(c, 2000))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _embedded_image(path: Path, title: str) -> str:
    """An <img> with the PNG inline (a data URI): the page stays whole when it is mailed on its own."""
    import base64

    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(title)}"></figure>'


def _best_per_row(rows: Sequence[Sequence[Any]]) -> list[list[str]]:
    """The metric rows as HTML cells, the best value of each row in bold."""
    cells = []
    for name, *values in rows:
        finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
        best = max(finite) if finite else None
        cells.append([html.escape(str(name))] + [
            f"<b>{format_cell(v)}</b>" if best is not None and v == best else html.escape(format_cell(v))
            for v in values])
    return cells


def report_html(report: EvaluationReport) -> str:
    """The report as one self-contained HTML page (report.html), in the order a colleague reads it: the verdict,
    the metrics of every model, the task's tables (per class, sample errors, ...), the pictures (loss curve,
    confusion matrix), then the lineage of the model. Pictures are inline, so the file can be sent alone."""
    header, rows = _metric_rows(report)
    out_dir = Path(report.html_path).parent
    summary = report.verdict or (f"On {report.primary_metric}, the fine-tuned model {_verdicts(report)}."
                                 if report.beats_baselines else "")
    metric_head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    metric_body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in _best_per_row(rows))
    verdicts = "".join(f"<li>{'beats' if won else '<b>does not beat</b>'} {html.escape(name.replace('_', ' '))} on "
                       f"{html.escape(report.primary_metric)}</li>" for name, won in report.beats_baselines.items())
    sections = "".join(f"<h2>{html.escape(t.title)}</h2>{_html_table(t.header, t.rows)}" for t in report.tables)
    images = "".join(f"<h2>{html.escape(title)}</h2>{_embedded_image(out_dir / name, title)}"
                     for title, name in report.images if (out_dir / name).is_file())
    lineage = _html_table(("what", "value"), tuple(report.lineage.items())) if report.lineage else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(report.pipeline)}: evaluation report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:.3em .6em;
vertical-align:top;text-align:left}}th{{background:#f3f3f3}}.summary{{font-size:1.15em;background:#eef6ee;
border-left:4px solid #3a3;padding:.6em 1em}}img{{max-width:100%}}figure{{margin:0}}code{{font-size:.9em}}</style>
</head><body>
<h1>{html.escape(report.pipeline)}: evaluation on {html.escape(report.headline)}</h1>
{f'<p class="summary" id="summary">{html.escape(summary)}</p>' if summary else ''}
<p><b>Promotion:</b> {html.escape(report.promotion.reason)}</p>
<h2>Metrics: the fine-tuned model and its baselines</h2>
<table id="metrics"><thead><tr>{metric_head}</tr></thead><tbody>{metric_body}</tbody></table>
<ul>{verdicts}</ul>
{sections}
{images}
{f'<h2 id="lineage">Lineage: what made this model</h2>{lineage}' if lineage else ''}
<p>checkpoint sha256 <code>{html.escape(report.checkpoint_sha256)}</code></p>
</body></html>
"""
