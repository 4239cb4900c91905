"""The tables and the transaction type every status change uses."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Connection, Table
from sqlalchemy.orm import Session

from jobs.models import Attempt, Batch, BatchMove, Job

# The statements a worker runs for every job use the tables, not the mapped
# classes: an ORM-enabled UPDATE synchronises the session's identity map after
# it runs, which took a fifth of a busy worker's GIL time for rows nobody had loaded.
jobs_table = cast(Table, Job.__table__)
batches_table = cast(Table, Batch.__table__)
attempts_table = cast(Table, Attempt.__table__)
moves_table = cast(Table, BatchMove.__table__)

#: Where a transaction's statements run: a session, or a Core connection.
Tx = Session | Connection
