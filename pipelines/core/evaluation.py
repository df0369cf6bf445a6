"""Judge a fine-tuned checkpoint on the test split, against a majority-class and a linear-probe baseline."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.files import write_bytes_atomic
from pipelines.core.records import CheckpointRecord, EvaluationReport
from pipelines.core.spec import PipelineSpec
from pipelines.core.training import (ComputeSettings, embed_texts, fit_linear_probe, load_classifier,
                                     load_encoder, load_tokenizer, predict_proba)

METRIC_NAMES = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision",
                "weighted_recall", "weighted_f1")


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy, and precision / recall / F1 averaged over classes (macro) and over rows (weighted)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(num_labels)),
                                                     average=average, zero_division=0)
        out.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    return out


def per_class_table(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> list[dict[str, Any]]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(range(len(labels))),
                                                 zero_division=0)
    return [{"label": label, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
             "support": int(s[i])} for i, label in enumerate(labels)]


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str) -> None:
    """A confusion-matrix heat map with counts, rows = true class, columns = predicted class."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    if len(labels) <= 30:
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def _metrics_table_md(rows: dict[str, dict[str, float]]) -> str:
    head = "| model | accuracy | macro P | macro R | macro F1 | weighted F1 |\n|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {name} | {m['accuracy']:.4f} | {m['macro_precision']:.4f} | {m['macro_recall']:.4f} | "
        f"{m['macro_f1']:.4f} | {m['weighted_f1']:.4f} |\n" for name, m in rows.items())


def _per_class_md(rows: Sequence[dict[str, Any]]) -> str:
    head = "| class | precision | recall | F1 | support |\n|---|---|---|---|---|\n"
    return head + "".join(f"| {r['label']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                          f"{r['support']} |\n" for r in rows)


def report_markdown(report: EvaluationReport) -> str:
    """The report as Markdown, for the Dagster UI."""
    rows = {"fine-tuned": report.metrics, **report.baselines}
    verdicts = ", ".join(f"{'beats' if won else 'does NOT beat'} {name}"
                         for name, won in report.beats_baselines.items())
    if report.champion_metrics is not None:
        rows[f"champion v{report.promotion.get('champion_version')}"] = report.champion_metrics
    return (f"**{report.pipeline}** on {report.test_rows} test rows — on {report.primary_metric} the "
            f"fine-tuned model {verdicts}.\n\n**Promotion:** {report.promotion.get('reason', '')}\n\n"
            + _metrics_table_md(rows) + "\n" + _per_class_md(report.per_class))


def _report_html(report: EvaluationReport, png_name: str) -> str:
    def table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
        th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        tr = "".join("<tr>" + "".join(f"<td>{html.escape(c if isinstance(c, str) else f'{c:.4f}' if isinstance(c, float) else str(c))}</td>"
                                      for c in row) + "</tr>" for row in body)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{tr}</tbody></table>"

    rows = {"fine-tuned": report.metrics, **report.baselines}
    if report.champion_metrics is not None:
        rows[f"champion v{report.promotion.get('champion_version')}"] = report.champion_metrics
    summary = table(["model", *METRIC_NAMES], [[name, *(m[k] for k in METRIC_NAMES)] for name, m in rows.items()])
    classes = table(["class", "precision", "recall", "f1", "support"],
                    [[r["label"], r["precision"], r["recall"], r["f1"], r["support"]] for r in report.per_class])
    verdicts = "".join(f"<li>{'beats' if won else '<b>does not beat</b>'} {html.escape(name)} on "
                       f"{html.escape(report.primary_metric)}</li>" for name, won in report.beats_baselines.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(report.pipeline)} evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style>
</head><body>
<h1>{html.escape(report.pipeline)}: evaluation on {report.test_rows} test rows</h1>
<p>checkpoint sha256 <code>{html.escape(report.checkpoint_sha256)}</code></p>
<ul>{verdicts}</ul>
<p><b>Promotion:</b> {html.escape(str(report.promotion.get("reason", "")))}</p>
<h2>Metrics</h2>{summary}
<h2>Per class</h2>{classes}
<h2>Confusion matrix</h2><img src="{html.escape(png_name)}" alt="confusion matrix">
</body></html>
"""


def decide_promotion(candidate: dict[str, float], champion: dict[str, float] | None,
                     baselines: dict[str, dict[str, float]], primary: str, min_improvement: float,
                     candidate_version: str | None, champion_version: str | None) -> dict[str, Any]:
    """Whether the candidate becomes champion, and why, in words a person can check."""
    value = candidate[primary]
    if candidate_version is not None and candidate_version == champion_version:
        return {"promote": False, "reason": f"v{candidate_version} is already the champion",
                "candidate_version": candidate_version, "champion_version": champion_version,
                "primary_metric": primary}
    if champion is None:
        beaten = [b for b, m in baselines.items() if value > m[primary]]
        missed = [b for b in baselines if b not in beaten]
        promote = not missed
        reason = (f"first model: {primary} {value:.4f} beats every baseline ({', '.join(beaten) or 'none'})"
                  if promote else f"first model but not promoted: {primary} {value:.4f} does not beat "
                                  f"{', '.join(missed)}")
    else:
        gain = value - champion[primary]
        promote = gain >= min_improvement
        verdict = "promoted" if promote else "not promoted"
        reason = (f"{verdict}: {primary} {value:.4f} vs champion v{champion_version} {champion[primary]:.4f} on "
                  f"the same test split, a change of {gain:+.4f} (needs at least +{min_improvement:g}, "
                  "promotion.min_improvement)")
    return {"promote": promote, "reason": reason, "candidate_version": candidate_version,
            "champion_version": champion_version, "primary_metric": primary}


def evaluate_checkpoint(splits: pd.DataFrame, checkpoint: CheckpointRecord, spec: PipelineSpec, out_dir: Path,
                        compute: ComputeSettings, champion: CheckpointRecord | None = None) -> EvaluationReport:
    """Metrics of the checkpoint, the baselines and the current champion (if any) on the test split.

    Decides whether the checkpoint should become champion; writes JSON, HTML and PNG to `out_dir`.
    """
    from sklearn.metrics import confusion_matrix

    compute.apply()
    labels = checkpoint.labels
    index = {label: i for i, label in enumerate(labels)}
    train = splits[splits["split"] == "train"]
    validation = splits[splits["split"] == "validation"]
    test = splits[splits["split"] == "test"]
    unknown = sorted(set(test["label"]) - set(labels))
    if unknown:
        raise ValueError(f"test split has labels the checkpoint was not trained on: {unknown}")
    y_test = test["label"].map(index).to_numpy()
    max_length = spec.training.max_length
    batch = spec.evaluation.batch_size

    model, tokenizer = load_classifier(checkpoint)
    y_pred = predict_proba(model, tokenizer, test["text"].tolist(), max_length, compute, batch).argmax(-1)
    metrics = classification_metrics(y_test, y_pred, len(labels))
    matrix = confusion_matrix(y_test, y_pred, labels=list(range(len(labels))))

    baselines: dict[str, dict[str, float]] = {}
    if "majority_class" in spec.evaluation.baselines:
        majority = index[train["label"].value_counts().idxmax()]
        baselines["majority_class"] = classification_metrics(y_test, np.full(len(y_test), majority), len(labels))
    if "linear_probe" in spec.evaluation.baselines:
        base = checkpoint.base_model
        encoder, base_tokenizer = load_encoder(base), load_tokenizer(base.local_path)

        def embed(frame: pd.DataFrame) -> np.ndarray:
            return embed_texts(encoder, base_tokenizer, frame["text"].tolist(), base.pooling, max_length, compute, batch)

        probe = fit_linear_probe(embed(train), train["label"].map(index).to_numpy(),
                                 embed(validation) if len(validation) else None,
                                 validation["label"].map(index).to_numpy() if len(validation) else None,
                                 spec.training.seed)
        baselines["linear_probe"] = classification_metrics(y_test, probe.predict(embed(test)), len(labels))

    champion_metrics = None
    if champion is not None and champion.model_version == checkpoint.model_version:
        champion_metrics = metrics  # re-evaluating the champion itself
    elif champion is not None:
        champion_model, champion_tokenizer = load_classifier(champion)
        index_of = {label: i for i, label in enumerate(champion.labels)}
        if set(test["label"]) - set(index_of):
            raise ValueError(f"the champion (v{champion.model_version}) does not know the labels "
                             f"{sorted(set(test['label']) - set(index_of))} of this test split")
        champion_pred = predict_proba(champion_model, champion_tokenizer, test["text"].tolist(), max_length,
                                      compute, batch).argmax(-1)
        champion_labels = np.array(champion.labels)[champion_pred]
        champion_metrics = classification_metrics(y_test, [index.get(lab, -1) for lab in champion_labels],
                                                  len(labels))

    primary = spec.evaluation.primary_metric
    beats = {name: metrics[primary] > m[primary] for name, m in baselines.items()}
    promotion = decide_promotion(metrics, champion_metrics, baselines, primary, spec.promotion.min_improvement,
                                 checkpoint.model_version, champion.model_version if champion else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "confusion_matrix.png"
    plot_confusion_matrix(matrix, labels, png, f"{spec.name}: test confusion matrix")
    report = EvaluationReport(
        pipeline=spec.name,
        checkpoint_sha256=checkpoint.sha256,
        test_rows=len(test),
        labels=labels,
        metrics=metrics,
        per_class=tuple(per_class_table(y_test, y_pred, labels)),
        confusion_matrix=tuple(tuple(int(v) for v in row) for row in matrix),
        baselines=baselines,
        primary_metric=primary,
        beats_baselines=beats,
        promotion=promotion,
        champion_metrics=champion_metrics,
        json_path=str(out_dir / "report.json"),
        html_path=str(out_dir / "report.html"),
        confusion_matrix_png=str(png),
    )
    write_bytes_atomic(Path(report.json_path), json.dumps(report.to_dict(), indent=2).encode())
    write_bytes_atomic(Path(report.html_path), _report_html(report, png.name).encode())
    return report
