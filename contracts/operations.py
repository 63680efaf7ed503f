"""Figures for watching the service (``/metrics`` gauges, the admin status page): what waits in
the batch queue and the mail outbox, and how many contracts are in each state. Read-only,
one grouped query each."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ._db import aware_utc
from .batches import Batch, BatchDocument, BatchStatus, DocumentState
from .mail import OutboxMessage
from .workflow_models import Contract, ContractStatus

__all__ = ["OperationFigures", "operation_figures"]


@dataclass(frozen=True)
class OperationFigures:
    #: Documents of started batches, by state (``waiting``, ``running``).
    queue_depth: dict[str, int]
    #: Messages not yet sent whose (next) attempt is due.
    mail_backlog: int
    #: Contracts by status, every status present (0 if none).
    contracts: dict[str, int]


def operation_figures(session: Session, *, now: dt.datetime | None = None) -> OperationFigures:
    """The current figures.

    :raises sqlalchemy.exc.SQLAlchemyError: the database cannot be read.
    """
    moment = aware_utc(now)
    open_states = (DocumentState.WAITING.value, DocumentState.RUNNING.value)
    queue = {state: 0 for state in open_states}
    rows = session.execute(
        select(BatchDocument.state, func.count())
        .join(Batch, Batch.id == BatchDocument.batch_id)
        .where(Batch.status == BatchStatus.RUNNING.value, BatchDocument.state.in_(open_states))
        .group_by(BatchDocument.state)
    ).all()
    for state, count in rows:
        queue[str(state)] = int(count)
    backlog = session.scalar(
        select(func.count())
        .select_from(OutboxMessage)
        .where(OutboxMessage.sent_at.is_(None), OutboxMessage.next_attempt_at <= moment)
    )
    contracts = {status.value: 0 for status in ContractStatus}
    for status, count in session.execute(
        select(Contract.status, func.count()).group_by(Contract.status)
    ).all():
        contracts[str(status)] = int(count)
    return OperationFigures(queue, int(backlog or 0), contracts)
