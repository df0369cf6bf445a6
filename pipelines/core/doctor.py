"""The data doctor's findings, as every task that has a doctor reports them: which labels are probably wrong, which
texts are near-duplicates under different labels, and whether more data would help; how they are written (CSV,
JSON, a plot) and summed up. The analysis that finds them belongs to the task (text classification's
pipelines/core/tasks/classification/doctor.py). The doctor never changes the data: it lists, a person decides.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.core.files import write_bytes_atomic
from pipelines.core.markdown import markdown_table

SUSPECT_COLUMNS = ["rank", "split", "text", "given_label", "suggested_label", "suggested_probability",
                   "given_label_probability", "source_file", "source_row"]
DUPLICATE_COLUMNS = ["similarity", "text_a", "label_a", "split_a", "text_b", "label_b", "split_b"]
MAX_DUPLICATE_PAIRS = 1000  # the most cross-class pairs kept (most similar first)


@dataclass(frozen=True)
class DoctorReport:
    """What the doctor found on one version of the data."""

    rows: int
    model: str  # the encoder whose embeddings were read
    suspects: pd.DataFrame  # every label suspect, most suspicious first (SUSPECT_COLUMNS)
    duplicates: pd.DataFrame  # cross-class near-duplicate pairs, most similar first (DUPLICATE_COLUMNS)
    curve: list[dict[str, Any]]  # [{share, train_rows, <metric>}] on the validation split
    metric: str
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def suspect_fraction(self) -> float:
        return len(self.suspects) / self.rows if self.rows else 0.0

    def summary(self) -> str:
        curve = ""
        if len(self.curve) >= 2:
            first, last = self.curve[0], self.curve[-1]
            curve = (f"; validation {self.metric} {first[self.metric]:.4f} on {first['share']:.0%} of train -> "
                     f"{last[self.metric]:.4f} on {last['share']:.0%}")
        return (f"{len(self.suspects):,} of {self.rows:,} rows ({self.suspect_fraction:.1%}) have a label that looks "
                f"wrong; {len(self.duplicates):,} near-duplicate pair(s) under different labels{curve}")

    def more_data_helps(self) -> str:
        """One sentence on the learning curve's last step."""
        if len(self.curve) < 2:
            return "no learning curve (it needs a validation split and at least two train shares)"
        a, b = self.curve[-2], self.curve[-1]
        gain = b[self.metric] - a[self.metric]
        rows = b["train_rows"] - a["train_rows"]
        verdict = ("more labelled data would probably still help" if gain > 0.01 else
                   "the curve is flattening: more data of the same kind would help little")
        return (f"going from {a['train_rows']:,} to {b['train_rows']:,} train rows (+{rows:,}) changed validation "
                f"{self.metric} by {gain:+.4f}: {verdict}")

    def suspects_markdown(self, limit: int) -> str:
        shown = self.suspects.head(limit)
        return markdown_table(
            ["#", "split", "text", "given", "suggested", "confidence", "source"],
            [[int(r["rank"]), r["split"], _short(r["text"]), r["given_label"], r["suggested_label"],
              f"{r['suggested_probability']:.2f}", f"{r['source_file']}:{r['source_row']}"]
             for _, r in shown.iterrows()], limit=100_000) if len(shown) else "no label suspects"

    def duplicates_markdown(self, limit: int) -> str:
        shown = self.duplicates.head(limit)
        return markdown_table(
            ["similarity", "text", "label", "text", "label"],
            [[f"{r['similarity']:.3f}", _short(r["text_a"]), r["label_a"], _short(r["text_b"]), r["label_b"]]
             for _, r in shown.iterrows()], limit=100_000) if len(shown) else "no near-duplicates across classes"

    def curve_markdown(self) -> str:
        return markdown_table(["share of train", "train rows", f"validation {self.metric}"],
                              [[f"{c['share']:.0%}", f"{c['train_rows']:,}", f"{c[self.metric]:.4f}"]
                               for c in self.curve], limit=100_000) if self.curve else "no learning curve"

    def to_json(self, limit: int) -> dict[str, Any]:
        return {"rows": self.rows, "model": self.model, "metric": self.metric, "seconds": round(self.seconds, 2),
                "suspect_count": len(self.suspects), "suspect_fraction": round(self.suspect_fraction, 4),
                "duplicate_pairs": len(self.duplicates), "summary": self.summary(),
                "more_data": self.more_data_helps(), "curve": self.curve, "settings": self.settings,
                "top_suspects": json.loads(self.suspects.head(limit).to_json(orient="records")),
                "top_duplicates": json.loads(self.duplicates.head(limit).to_json(orient="records"))}

    def write(self, folder: Path, limit: int) -> dict[str, Path]:
        """doctor.json, label_suspects.csv (every suspect), near_duplicates.csv and learning_curve.png, each
        written to a temporary file and renamed."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / "doctor.json", "suspects_csv": folder / "label_suspects.csv",
                 "duplicates_csv": folder / "near_duplicates.csv"}
        write_bytes_atomic(paths["json"], json.dumps(self.to_json(limit), indent=2).encode())
        write_bytes_atomic(paths["suspects_csv"], self.suspects.to_csv(index=False).encode())
        write_bytes_atomic(paths["duplicates_csv"], self.duplicates.to_csv(index=False).encode())
        if self.curve:
            paths["curve_png"] = folder / "learning_curve.png"
            write_bytes_atomic(paths["curve_png"], self._curve_png())
        return paths

    def _curve_png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        ax.plot([c["train_rows"] for c in self.curve], [c[self.metric] for c in self.curve], marker="o")
        ax.set_xlabel("train rows")
        ax.set_ylabel(f"validation {self.metric}")
        ax.set_title("Learning curve (linear probe on frozen embeddings)", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        return buffer.getvalue()


def _short(text: Any, width: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"
