"""``POST /v1/files``: a multipart upload streamed into Postgres as it arrives.

python-multipart parses the request body as it comes off the socket; the bytes of
the ``file`` part go straight to a :class:`jobs.files.Upload` (one chunk in memory
at a time), and ``purpose`` is collected on the way. The upload is committed only
once the whole body is in and valid; anything else rolls it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from jobs.files import Upload, UploadError
from jobs.models import File

#: Largest non-file form field (``purpose``), bytes.
MAX_FIELD_BYTES = 1024


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Form:
    """What the parser has seen so far: the parts, the current header, the file's bytes."""

    def __init__(self) -> None:
        self.parts: list[_Part] = []
        self.pending: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._name = bytearray()
        self._value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name.extend(data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value.extend(data[start:end])

    def on_header_end(self) -> None:
        self._headers[bytes(self._name).lower()] = bytes(self._value)
        self._name.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        _, disposition = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode(errors="replace")
        filename = disposition.get(b"filename")
        self.parts.append(_Part(name, filename.decode(errors="replace") if filename else None))
        self._headers.clear()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        if part.name == "file":
            self.pending.append(bytes(data[start:end]))
        elif len(part.data) + end - start <= MAX_FIELD_BYTES:
            part.data.extend(data[start:end])

    def parser(self, boundary: bytes) -> MultipartParser:
        return MultipartParser(
            boundary,
            {
                "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value,
                "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished,
                "on_part_data": self.on_part_data,
            },
        )

    def take(self) -> bytes:
        data = b"".join(self.pending)
        self.pending.clear()
        return data

    def file_part(self) -> _Part | None:
        return next((p for p in self.parts if p.name == "file"), None)

    def field(self, name: str) -> str | None:
        part = next((p for p in self.parts if p.name == name), None)
        return part.data.decode(errors="replace") if part is not None else None


async def receive_upload(request: Request, database_url: str, max_bytes: int) -> File:
    """Store the request's ``file`` part; raises :class:`UploadError` when it is refused."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadError(
            "send the file as multipart/form-data, with fields 'file' and 'purpose'",
            code="invalid_request",
        )
    form = _Form()
    parser = form.parser(boundary)
    upload: Upload | None = None
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if form.pending:
                if upload is None:
                    upload = await run_in_threadpool(_begin, database_url, form, max_bytes)
                await run_in_threadpool(upload.write, form.take())
        parser.finalize()
        if form.file_part() is None:
            raise UploadError("the 'file' field is missing", code="invalid_request")
        if upload is None:
            upload = await run_in_threadpool(_begin, database_url, form, max_bytes)
        purpose = form.field("purpose")
        if purpose != "batch":
            raise UploadError(
                f"purpose must be 'batch' (files for the Batches API), got {purpose!r}",
                code="invalid_purpose",
            )
        stored = await run_in_threadpool(upload.finish)
        upload = None
        return stored
    finally:
        if upload is not None:
            await run_in_threadpool(upload.abort)


def _begin(database_url: str, form: _Form, max_bytes: int) -> Upload:
    part = form.file_part()
    filename = part.filename if part is not None and part.filename else "upload.jsonl"
    # The purpose field may come after the file: it is checked once the body is in.
    return Upload(database_url, filename=filename, purpose="batch", max_bytes=max_bytes)
