"""The Files API's storage: uploads streamed into Postgres as they arrive, read back the same way.

An upload (:class:`Upload`) is written a chunk of :data:`CHUNK_BYTES` at a time into
``file_chunks``, inside one transaction, while each line is checked to be a JSON
object: memory holds one chunk and one line, whatever the file's size, and a file
that is too large or not JSONL leaves nothing behind (the transaction rolls back).

A batch's output and error files have no chunks: their bytes are rendered from the
batch's jobs when they are read (:mod:`jobs.outputs`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy import Connection, delete, insert, select, update

from jobs import outputs
from jobs.db import get_engine, session_scope
from jobs.models import File, FileChunk, FilePurpose, FileRole
from jobs.store import new_id

#: Bytes of one stored chunk.
CHUNK_BYTES = 1024 * 1024
#: Longest line an upload may hold (the batch validator's own limit).
MAX_LINE_BYTES = 10 * 1024 * 1024
#: Chunks read from Postgres at a time.
READ_PAGE = 8


class UploadError(ValueError):
    """An upload that cannot be stored; ``code`` and ``status`` are the HTTP answer's."""

    def __init__(self, message: str, *, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class Upload:
    """One file being uploaded: :meth:`write` its bytes as they come, then :meth:`finish`.

    Everything is one transaction: until :meth:`finish` commits, no part of the file
    is visible, and :meth:`abort` (or any error) leaves nothing behind.
    """

    def __init__(self, database_url: str, *, filename: str, purpose: str, max_bytes: int) -> None:
        if purpose != FilePurpose.BATCH:
            raise UploadError(
                f"purpose must be 'batch' (files for the Batches API), got {purpose!r}",
                code="invalid_purpose",
            )
        self.id = new_id("file-")
        self.filename = filename[:255] or "upload.jsonl"
        self.bytes = 0
        self.max_bytes = max_bytes
        self._seq = 0
        self._buffer = bytearray()
        self._line = bytearray()
        self._line_number = 0
        self._context = get_engine(database_url).begin()
        self._tx: Connection = self._context.__enter__()
        self._tx.execute(
            insert(File).values(
                id=self.id,
                purpose=FilePurpose.BATCH,
                role=FileRole.INPUT,
                filename=self.filename,
                bytes=0,
            )
        )

    def write(self, data: bytes) -> None:
        """Store the next bytes of the file; raises :class:`UploadError` when it is refused."""
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            raise UploadError(
                f"the file is larger than {self.max_bytes} bytes (MAX_UPLOAD_BYTES)",
                code="file_too_large",
                status=413,
            )
        self._check_lines(data)
        self._buffer += data
        while len(self._buffer) >= CHUNK_BYTES:
            self._store(bytes(self._buffer[:CHUNK_BYTES]))
            del self._buffer[:CHUNK_BYTES]

    def finish(self) -> File:
        """Commit the whole file; returns its row."""
        if self._line.strip():
            self._check_line(bytes(self._line))
        if self.bytes == 0 or self._line_number == 0:
            raise UploadError("the file is empty", code="empty_file")
        if self._buffer:
            self._store(bytes(self._buffer))
            self._buffer.clear()
        self._tx.execute(update(File).where(File.id == self.id).values(bytes=self.bytes))
        row = self._tx.execute(select(File).where(File.id == self.id)).one()
        self._context.__exit__(None, None, None)
        return File(**row._asdict())

    def abort(self) -> None:
        """Forget everything written (nothing was committed)."""
        error = RuntimeError("upload aborted")
        self._context.__exit__(RuntimeError, error, None)

    def _store(self, data: bytes) -> None:
        self._tx.execute(insert(FileChunk).values(file_id=self.id, seq=self._seq, data=data))
        self._seq += 1

    def _check_lines(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._line += data[start:]
                if len(self._line) > MAX_LINE_BYTES:
                    raise UploadError(
                        f"line {self._line_number + 1} is longer than {MAX_LINE_BYTES} bytes",
                        code="invalid_file",
                    )
                return
            self._line += data[start:end]
            line = bytes(self._line)
            self._line.clear()
            self._check_line(line)
            start = end + 1

    def _check_line(self, line: bytes) -> None:
        self._line_number += 1
        if self._line_number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            return
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise UploadError(
                f"not a JSONL file: line {self._line_number} is not JSON ({exc})",
                code="invalid_file",
            ) from None
        if not isinstance(value, dict):
            raise UploadError(
                f"not a JSONL file: line {self._line_number} is not a JSON object",
                code="invalid_file",
            )


def get(database_url: str, file_id: str) -> File | None:
    with session_scope(database_url) as session:
        return session.get(File, file_id)


def listing(
    database_url: str, *, after: str | None, limit: int, purpose: str | None, newest_first: bool
) -> tuple[list[File], bool]:
    """A page of files and whether more follow, ordered by creation (then id)."""
    with session_scope(database_url) as session:
        query = select(File)
        if purpose is not None:
            query = query.where(File.purpose == purpose)
        if after is not None:
            anchor = session.get(File, after)
            if anchor is not None:
                key = (File.created_at, File.id)
                mark = (anchor.created_at, anchor.id)
                if newest_first:
                    query = query.where(
                        (key[0] < mark[0]) | ((key[0] == mark[0]) & (key[1] < mark[1]))
                    )
                else:
                    query = query.where(
                        (key[0] > mark[0]) | ((key[0] == mark[0]) & (key[1] > mark[1]))
                    )
        order = (
            (File.created_at.desc(), File.id.desc()) if newest_first else (File.created_at, File.id)
        )
        rows = list(session.execute(query.order_by(*order).limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit


def delete_file(database_url: str, file_id: str) -> bool:
    with session_scope(database_url) as session:
        gone = session.execute(delete(File).where(File.id == file_id).returning(File.id)).all()
    return bool(gone)


def content(database_url: str, file: File) -> Iterator[bytes]:
    """The file's bytes, a few chunks (or a page of output lines) at a time."""
    if file.role == FileRole.INPUT:
        yield from _chunks(database_url, file.id)
    elif file.batch_id is not None:
        yield from outputs.render(database_url, file.batch_id, FileRole(file.role))


def _chunks(database_url: str, file_id: str) -> Iterator[bytes]:
    seq = 0
    while True:
        with session_scope(database_url) as session:
            rows = list(
                session.execute(
                    select(FileChunk.data)
                    .where(FileChunk.file_id == file_id, FileChunk.seq >= seq)
                    .order_by(FileChunk.seq)
                    .limit(READ_PAGE)
                ).scalars()
            )
        if not rows:
            return
        yield from rows
        seq += len(rows)


class _ChunkReader(io.RawIOBase):
    """A stored upload as a binary stream, for the batch validator's line reader."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._current = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._current:
            try:
                self._current = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self._current))
        buffer[:size] = self._current[:size]
        self._current = self._current[size:]
        return size


def open_input(database_url: str, file_id: str) -> BinaryIO:
    """An uploaded file's bytes as a buffered binary stream (read once, front to back)."""
    return io.BufferedReader(_ChunkReader(_chunks(database_url, file_id)), CHUNK_BYTES)
