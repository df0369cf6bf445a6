"""The Dagster instance's SQLite event log, with atomic concurrency-slot claims.

Dagster's op concurrency pools (our `training` pool) claim a slot by selecting a free slot row `FOR UPDATE SKIP
LOCKED` and then writing the step into it. PostgreSQL honours the row lock, so of two steps that claim at the same
moment one gets the slot and the other waits. SQLite ignores `FOR UPDATE`: both select the same free row, both
write it, and both steps run — two trainings at once, as two `tuneline run`s started together showed. Here the
write only takes a row that is still free, so the loser of the race is blocked and claims again once the slot is
freed (SQLite serializes writes, so the conditional update is atomic). Everything else is Dagster's own storage;
`tuneline` names this class in the dagster.yaml it writes for a SQLite instance."""

from __future__ import annotations

from typing import Any

import sqlalchemy as db
from dagster._core.storage.event_log.schema import ConcurrencySlotsTable
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.sqlalchemy_compat import db_select
from dagster._utils.concurrency import ConcurrencySlotStatus


class AtomicClaimSqliteEventLogStorage(SqliteEventLogStorage):
    """SqliteEventLogStorage whose slot claim is a compare-and-set: a slot is taken only if no step holds it."""

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> AtomicClaimSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _claim_concurrency_slot(self, concurrency_key: str, run_id: str, step_key: str) -> ConcurrencySlotStatus:
        free = db.and_(ConcurrencySlotsTable.c.concurrency_key == concurrency_key,
                       ConcurrencySlotsTable.c.step_key == None,  # noqa: E711 - SQL IS NULL
                       ConcurrencySlotsTable.c.deleted == False)  # noqa: E712 - SQL comparison
        with self.index_connection() as conn:
            row = conn.execute(db_select([ConcurrencySlotsTable.c.id]).select_from(ConcurrencySlotsTable)
                               .where(free).limit(1)).fetchone()
            if not row or not row[0]:
                return ConcurrencySlotStatus.BLOCKED
            taken = conn.execute(ConcurrencySlotsTable.update().values(run_id=run_id, step_key=step_key)
                                 .where(db.and_(ConcurrencySlotsTable.c.id == row[0], free))).rowcount
            return ConcurrencySlotStatus.CLAIMED if taken else ConcurrencySlotStatus.BLOCKED
