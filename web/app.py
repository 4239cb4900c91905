"""The routes: OpenAI's Files and Batches API, and the dashboard's.

Every route but ``GET /health`` needs a key (:mod:`web.auth`). Every refusal is a
4xx with OpenAI's error body (:mod:`web.errors`), and none leaves a partial file or
batch behind: an upload is one transaction, a batch is stored in one.

| route | what it does |
|---|---|
| ``POST /v1/files`` | store an upload (multipart ``file`` and ``purpose=batch``) |
| ``GET /v1/files`` | list files (``purpose``, ``limit``, ``order``, ``after``) |
| ``GET /v1/files/{id}`` / ``DELETE`` | one file / delete it |
| ``GET /v1/files/{id}/content`` | its bytes, streamed |
| ``POST /v1/batches`` | create a batch from an uploaded file; ``validating`` at once |
| ``GET /v1/batches`` | list batches, newest first (``after``, ``limit``) |
| ``GET /v1/batches/{id}`` | one batch |
| ``POST /v1/batches/{id}/cancel`` | cancel one |

The dashboard's pages (``/``, ``/batches/{id}``) and their JSON are in :mod:`web.dashboard`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from python_multipart.exceptions import MultipartParseError
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from jobs import api, files, shapes, store
from jobs.db import session_scope
from jobs.files import UploadError
from jobs.models import Batch
from jobs.settings import Settings
from jobs.validation import ValidationError
from web.auth import REALM, authorized
from web.dashboard import Dashboard
from web.errors import api_error, not_found
from web.uploads import receive_upload

#: Routes anyone may call.
OPEN_PATHS = frozenset({"/health"})
#: ``limit`` of a list: OpenAI's default and largest.
DEFAULT_LIMIT, MAX_LIMIT = 20, 100
#: Largest JSON body of ``POST /v1/batches``.
MAX_JSON_BYTES = 64 * 1024


class _Keys(BaseHTTPMiddleware):
    """401 with OpenAI's error body for a request without a valid key."""

    def __init__(self, app: Any, keys: tuple[str, ...]) -> None:
        super().__init__(app)
        self.keys = keys

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path in OPEN_PATHS or authorized(request, self.keys):
            return await call_next(request)
        # A browser on the dashboard gets the login prompt; an API client the JSON error.
        challenge = {"WWW-Authenticate": f'Basic realm="{REALM}"'}
        api_path = request.url.path.startswith("/v1/")
        return api_error(
            401,
            "Incorrect or missing API key: send Authorization: Bearer <one of API_KEYS>",
            type_="authentication_error",
            code="invalid_api_key",
            headers=None if api_path else challenge,
        )


def _limit(request: Request) -> int | JSONResponse:
    raw = request.query_params.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        return api_error(400, f"limit must be 1 to {MAX_LIMIT}, got {raw!r}", param="limit")
    return int(raw)


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


class Api:
    """The endpoints, bound to one process's settings."""

    def __init__(self, settings: Settings) -> None:
        assert settings.database_url is not None
        self.settings = settings
        self.url = settings.database_url
        self.ctx = api.context(settings)

    def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def upload_file(self, request: Request) -> Response:
        try:
            stored = await receive_upload(request, self.url, self.settings.max_upload_bytes)
        except UploadError as exc:
            return api_error(exc.status, str(exc), code=exc.code, param="file")
        except MultipartParseError as exc:
            return api_error(400, f"malformed multipart body: {exc}", code="invalid_request")
        return JSONResponse(shapes.file_object(stored))

    def list_files(self, request: Request) -> Response:
        limit = _limit(request)
        if isinstance(limit, JSONResponse):
            return limit
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            return api_error(400, f"order must be asc or desc, got {order!r}", param="order")
        found, more = files.listing(
            self.url,
            after=request.query_params.get("after"),
            limit=limit,
            purpose=request.query_params.get("purpose"),
            newest_first=order == "desc",
        )
        return JSONResponse(_page([shapes.file_object(f) for f in found], more))

    def get_file(self, request: Request) -> Response:
        found = files.get(self.url, request.path_params["file_id"])
        return JSONResponse(shapes.file_object(found)) if found else not_found("file")

    def delete_file(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if not files.delete_file(self.url, file_id):
            return not_found("file")
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    def file_content(self, request: Request) -> Response:
        found = files.get(self.url, request.path_params["file_id"])
        if found is None:
            return not_found("file")
        return StreamingResponse(
            files.content(self.url, found),
            media_type="application/jsonl",
            headers={"Content-Length": str(found.bytes)} if found.role == "input" else None,
        )

    async def create_batch(self, request: Request) -> Response:
        raw = await request.body()
        if len(raw) > MAX_JSON_BYTES:
            return api_error(413, "the request body is too large", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return api_error(400, "the request body is not valid JSON", code="invalid_json")
        if not isinstance(body, dict):
            return api_error(400, "the request body must be a JSON object", code="invalid_json")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                return api_error(
                    400, f"{name} is required (a string)", param=name, code="missing_parameter"
                )
        try:
            handle = await run_in_threadpool(
                lambda: api.create_file_batch(
                    body["input_file_id"],
                    endpoint=body["endpoint"],
                    completion_window=body["completion_window"],
                    metadata=body.get("metadata"),
                    settings=self.settings,
                )
            )
        except api.NotFoundError as exc:
            return api_error(404, str(exc), param="input_file_id", code="not_found")
        except ValidationError as exc:
            return api_error(400, str(exc), param=exc.field, code="invalid_request")
        return JSONResponse(batch_objects(self.settings, [handle.id])[0])

    def list_batches(self, request: Request) -> Response:
        limit = _limit(request)
        if isinstance(limit, JSONResponse):
            return limit
        after = request.query_params.get("after")
        after_id = shapes.parse_batch_id(after) if after else None
        with session_scope(self.url) as session:
            query = select(Batch.id).order_by(Batch.id.desc()).limit(limit + 1)
            if after_id is not None:
                query = query.where(Batch.id < after_id)
            ids = list(session.execute(query).scalars())
        data = batch_objects(self.settings, ids[:limit])
        return JSONResponse(_page(data, len(ids) > limit))

    def get_batch(self, request: Request) -> Response:
        batch_id = shapes.parse_batch_id(request.path_params["batch_id"])
        found = batch_objects(self.settings, [batch_id]) if batch_id is not None else []
        return JSONResponse(found[0]) if found else not_found("batch")

    def cancel_batch(self, request: Request) -> Response:
        batch_id = shapes.parse_batch_id(request.path_params["batch_id"])
        if batch_id is None:
            return not_found("batch")
        try:
            api.BatchHandle(batch_id, self.ctx).cancel()
        except api.NotFoundError:
            return not_found("batch")
        return JSONResponse(batch_objects(self.settings, [batch_id])[0])

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/health", self.health),
            Route("/v1/files", self.upload_file, methods=["POST"]),
            Route("/v1/files", self.list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", self.get_file, methods=["GET"]),
            Route("/v1/files/{file_id}", self.delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
            Route("/v1/batches", self.create_batch, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self.cancel_batch, methods=["POST"]),
        ]


def create_app(settings: Settings) -> Starlette:
    """The web app on resolved settings (database, Redis and API keys set)."""
    return Starlette(
        routes=[*Api(settings).routes(), *Dashboard(settings).routes()],
        middleware=[Middleware(_Keys, keys=settings.api_keys)],
        exception_handlers={404: _unknown_route, 405: _wrong_method},
    )


async def _unknown_route(request: Request, exc: Exception) -> Response:
    return api_error(404, f"Unknown route {request.method} {request.url.path}", code="not_found")


async def _wrong_method(request: Request, exc: Exception) -> Response:
    return api_error(405, f"{request.method} is not allowed on {request.url.path}")


def batch_objects(settings: Settings, batch_ids: list[int]) -> list[dict[str, Any]]:
    """OpenAI batch objects of these batches, in the order given (unknown ones left out)."""
    assert settings.database_url is not None
    with session_scope(settings.database_url) as session:
        rows = {
            b.id: b for b in session.execute(select(Batch).where(Batch.id.in_(batch_ids))).scalars()
        }
        counts = store.live_counts(session, list(rows))
    known = [i for i in batch_ids if i in rows]
    extra = shapes.batch_usage(settings.database_url, known, settings.price_for)
    return [
        shapes.batch_object(
            rows[i], counts=counts[i], model=e["model"], usage=e["usage"], usd=e["usd"]
        )
        for i in known
        for e in (extra[i],)
    ]
