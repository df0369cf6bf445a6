"""Specific errors that name the file, row, column or field at fault and what was expected."""

from __future__ import annotations


class TunelineError(Exception):
    """Base class: every error tuneline raises on purpose derives from it."""


class SpecError(TunelineError):
    """A pipeline spec is invalid. Lists every problem with its path in the file."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{path}: {len(self.problems)} {noun} in pipeline spec:\n{lines}")


class SourceError(TunelineError):
    """A data source cannot be read, or its content is not what the spec says."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None) -> None:
        self.file, self.row, self.column = file, row, column
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class ModelSourceError(TunelineError):
    """A base model cannot be resolved to local weights."""


class CheckpointError(TunelineError):
    """A fine-tuned checkpoint on disk does not match its record."""


class InstanceError(TunelineError):
    """The Dagster instance's settings (environment variables, dagster.yaml) are wrong, or its database cannot be
    reached. Never carries a password."""


class StepInterrupted(TunelineError):
    """A step stopped by SIGINT or SIGTERM (Ctrl-C, `kill`, a stopped container): failed for good, not retried."""


class InitError(TunelineError):
    """`tuneline init` cannot write a spec for this data; the message says why and what to pass."""


class DataFolderError(TunelineError):
    """The folder tuneline writes its data to (or one inside it) cannot be written: no permission, a read-only file
    system, no space left."""
