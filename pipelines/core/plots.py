"""Plots a person looks at on the asset's page and in report.html, drawn with matplotlib (Agg, no display)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def loss_curve_png(history: Sequence[dict[str, float]]) -> bytes | None:
    """Training loss by optimizer step and validation loss at each evaluation, from a Trainer's log history
    (entries with `loss` or `eval_loss`, each at its `step`); None when the history holds no loss."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    validation = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not validation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1.2)
    if validation:
        ax.plot(*zip(*validation, strict=True), label="validation loss", marker="o", linewidth=1.2)
    epochs = {int(h["step"]): h["epoch"] for h in history if "eval_loss" in h and "epoch" in h and "step" in h}
    for step, epoch in epochs.items():  # where each epoch ended
        ax.axvline(step, color="grey", alpha=0.25, linewidth=0.8)
        ax.annotate(f"epoch {epoch:g}", (step, 1), xycoords=("data", "axes fraction"), fontsize=7, ha="right",
                    va="top", color="grey", rotation=90)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Training and validation loss", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig, plt)


def _png(fig: Any, plt: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def png_markdown(png: bytes, title: str) -> str:
    """A PNG as a Markdown image with the picture inline (a data URI), which the Dagster UI shows on the asset's
    page (and any Markdown viewer without the file beside it)."""
    import base64

    return f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"
