"""YAML read with bounded resources: nesting and size are counted on the parser's events (no recursion, no values
built) before a document is composed, so a hostile file is refused instead of exhausting the stack or the memory."""

from __future__ import annotations

import yaml


class YamlLimit(ValueError):
    """A YAML text past a limit: `line` (1-based) and `problem`; str() is "line N: problem"."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line, self.problem = line, problem


def check_events(text: str, *, max_depth: int, max_values: int | None = None, hint: str = "") -> None:
    """Raise YamlLimit (the problem ends with `hint`) when `text` nests mappings and lists deeper than `max_depth`
    or holds more than `max_values` values (aliases not expanded). A syntax error is left to the composer, whose
    message is clearer."""
    depth = values = 0
    try:  # libyaml's parser when present: fast and not recursive
        for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > max_depth:
                    raise YamlLimit(event.start_mark.line + 1, f"nested more than {max_depth} levels deep{hint}")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            values += isinstance(event, yaml.NodeEvent)
            if max_values is not None and values > max_values:
                raise YamlLimit(event.start_mark.line + 1, f"holds more than {max_values} values{hint}")
    except yaml.YAMLError:
        pass
