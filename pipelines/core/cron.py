"""The cron expressions and time zones a retraining schedule may use: those Dagster's scheduler accepts and can
fire. Checked when the spec is read, so that a schedule Dagster would refuse (or one that never fires) is a spec
error naming schedule.cron or schedule.timezone, not a traceback when the code location loads.

The grammar is standard 5-field cron: numbers, `*`, ranges `a-b`, steps `/n` and comma lists, with month and
weekday names (jan, mon). Extensions that only some cron dialects know (`L`, `W`, `#`, `?`, `H`, `@daily`) are
refused with the forms that work. tests/core/test_spec_properties.py checks that every expression accepted here
builds a Dagster schedule and has a next tick.
"""

from __future__ import annotations

import re

SYNTAX = ("numbers, '*', ranges like 1-5, steps like */15, lists like 1,15 and names like mon or jan; "
          "e.g. '0 3 * * 1' for Mondays at 03:00")
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("weekday", 0, 7))
_MONTHS = {name: i for i, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}
_WEEKDAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_NAMES = ({}, {}, {}, _MONTHS, _WEEKDAYS)
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February 29 fires in leap years
_ITEM = re.compile(r"(?P<start>\*|[0-9]{1,2}|[a-z]{3})(?:-(?P<end>[0-9]{1,2}|[a-z]{3}))?(?:/(?P<step>[0-9]{1,2}))?")


def _value(text: str, low: int, high: int, names: dict[str, int]) -> int | str:
    if text.isdigit():
        number = int(text)
        return number if low <= number <= high else f"{number} is outside {low}-{high}"
    if text in names:
        return names[text]
    return f"{text!r} is not a number" + (f" or a name ({', '.join(names)})" if names else "")


def _field_values(text: str, low: int, high: int, names: dict[str, int]) -> set[int] | str:
    """The values one field selects, or what is wrong with it."""
    values: set[int] = set()
    for item in text.split(","):
        match = _ITEM.fullmatch(item.lower())
        if match is None:
            return f"{item!r} is not a value, range or step ({SYNTAX})"
        start, end, step = match.group("start", "end", "step")
        if start == "*":
            if end is not None:
                return f"{item!r}: '*' takes no range"
            first, last = low, high
        else:
            found = _value(start, low, high, names)
            if isinstance(found, str):
                return found
            first = last = found
            if end is not None:
                found = _value(end, low, high, names)
                if isinstance(found, str):
                    return found
                last = found
                if last < first:
                    return f"the range {item!r} runs backwards: write it from the smaller value to the larger"
            elif step is not None:  # `5/15` is `5-<high>/15`
                last = high
        if step is not None and int(step) < 1:
            return f"the step in {item!r} must be 1 or more"
        # Dagster warns about, and normalises, a range or step whose step (1 when none is written) passes the range's
        # end: the schedule would run more often than written.
        if (end is not None or step is not None) and int(step or 1) > last:
            if step is None:
                return f"the range {item!r} ends at 0, which Dagster misreads: write the single value 0"
            return (f"the step of {int(step)} in {item!r} goes past the range's end ({last}): Dagster would run the "
                    "schedule more often than the step says; list the values instead")
        values.update(range(first, last + 1, int(step or 1)))
    return values


def cron_problem(expression: str) -> str | None:
    """What is wrong with a cron expression, or None when Dagster's scheduler accepts it and it fires."""
    parts = expression.split() if expression.isascii() else []  # the schema passes them on joined by one space
    if len(parts) != 5:
        return f"expected a cron expression with 5 fields (minute hour day month weekday), got {expression!r}"
    selected = []
    for part, (name, low, high), names in zip(parts, _FIELDS, _NAMES, strict=True):
        found = _field_values(part, low, high, names)
        if isinstance(found, str):
            return f"{name} field {part!r}: {found}"
        selected.append(found)
    days, months = selected[2], selected[3]
    if not any(day <= _DAYS_IN_MONTH[month - 1] for month in months for day in days):
        return (f"day {parts[2]!r} of month {parts[3]!r} never occurs, so the schedule would never run: choose a "
                "day that the month has")
    return None


def timezone_problem(name: str) -> str | None:
    """What is wrong with a time zone name, or None when it names an IANA zone (what Dagster's scheduler loads)."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(name)
    except (ValueError, OSError, zoneinfo.ZoneInfoNotFoundError):
        pass
    else:
        return None
    import difflib

    known = {zone.lower(): zone for zone in zoneinfo.available_timezones()}
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    hint = f"; did you mean {known[close[0]]!r}?" if close else ", e.g. 'UTC' or 'Europe/Berlin'"
    return f"{name!r} is not an IANA time zone name{hint}"
