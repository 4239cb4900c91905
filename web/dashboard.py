"""The dashboard's routes: pages for a browser, the JSON state they poll, their assets.

| route | what it serves |
|---|---|
| ``GET /`` | batches (newest first) with progress, and the throttle: chart and live state |
| ``GET /state.json`` | the same numbers as JSON, polled by the page every two seconds |
| ``GET /throttle.svg`` | the throttle chart alone, fetched again by the page |
| ``GET /batches/{id}`` | one batch: counts, stamps, files, failed jobs, validation errors |
| ``GET /batches/{id}/state.json`` | that page's numbers as JSON |
| ``GET /static/…`` | the page's script and style sheet, from ``web/static`` |

Behind the same keys as the API (:mod:`web.app`'s middleware): a browser logs in
with HTTP Basic, any user name and a key of ``API_KEYS`` as the password. The data
comes from :mod:`jobs.dashboard_data`; this module only picks it and shapes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from jobs import budget, dryrun, shapes
from jobs import dashboard_data as data
from jobs.dashboard_data import BatchDetail, BatchSummary, LiveState, MinuteUsage
from jobs.db import session_scope
from jobs.pricing import usage_text
from jobs.settings import Settings
from jobs.shapes import batch_public_id, parse_batch_id
from web import pages
from web.chart import throttle_svg

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The pages load nothing from elsewhere; inline ``style`` carries the progress widths.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
STATE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _iso(moment: Any) -> str | None:
    return moment.isoformat() if moment is not None else None


def batch_json(b: BatchSummary, pace: str = "") -> dict[str, Any]:
    return {
        "id": batch_public_id(b.id),
        "number": b.id,
        "name": b.name,
        "status": b.status,
        "total": b.total,
        "queued": b.queued,
        "running": b.running,
        "succeeded": b.succeeded,
        "failed": b.failed,
        "cancelled": b.cancelled,
        "done": b.done,
        "created_at": _iso(b.created_at),
        "finished_at": _iso(b.finished_at),
        "elapsed_s": round(b.elapsed_s, 3),
        "elapsed": pages.duration(b.elapsed_s),
        "pace": pace,
    }


def limits(settings: Settings) -> tuple[int, int]:
    """The chart's limits: every bucket serving the default model together (the ledger
    it charts counts the calls of every attachment)."""
    return settings.limits_for(settings.model_id) or (settings.rpm, settings.tpm)


def throttle_json(state: LiveState, usage: list[MinuteUsage], settings: Settings) -> dict[str, Any]:
    rpm, tpm = limits(settings)
    return {
        "rpm_limit": rpm,
        "tpm_limit": tpm,
        "minutes": [
            {"minute": u.start.isoformat(), "requests": u.requests, "tokens": u.tokens}
            for u in usage
        ],
        "backlog": state.backlog,
        "running": state.running,
        "in_flight": state.in_flight,
        "workers": state.workers,
        "paused_for_s": state.paused_for_s,
        "pause": pages.pause_text(state),
        "circuit": state.circuit,
        "redis_error": state.redis_error,
    }


def detail_json(detail: BatchDetail, usage: str = "") -> dict[str, Any]:
    return {
        "batch": batch_json(detail.summary) | {"usage": usage},
        "version": pages.batch_version(detail),
        "input_file_id": detail.input_file_id,
        "output_file_id": detail.output_file_id,
        "error_file_id": detail.error_file_id,
        "timestamps": {name: _iso(moment) for name, moment in detail.timestamps},
        "validation_errors": detail.validation_errors,
        "failed_jobs": [
            {
                "id": j.id,
                "custom_id": j.custom_id,
                "error_code": j.error_code,
                "error_status": j.error_status,
                "last_error": j.last_error,
                "attempts": j.attempts,
                "finished_at": _iso(j.finished_at),
            }
            for j in detail.failed_jobs
        ],
        "failed_jobs_shown": len(detail.failed_jobs),
    }


class Dashboard:
    """The routes, bound to one process's settings."""

    def __init__(self, settings: Settings) -> None:
        assert settings.database_url is not None
        self.settings = settings
        self.url = settings.database_url

    def _chart(self) -> tuple[list[MinuteUsage], str]:
        usage = data.throttle_minutes(self.url)
        rpm, tpm = limits(self.settings)
        return usage, throttle_svg(usage, rpm=rpm, tpm=tpm)

    def _paces(self, batches: list[BatchSummary]) -> dict[int, str]:
        """The pace of each batch under way (:func:`jobs.dryrun.pace`), as a cell's text;
        a paused batch's reason instead."""
        return {
            b.id: f"paused: {b.paused_reason}"
            if b.paused_reason
            else dryrun.pace(self.settings, b.id).short()
            for b in batches
            if not b.finished
        }

    def overview(self, request: Request) -> Response:
        batches = data.recent_batches(self.url)
        _, svg = self._chart()
        html = pages.overview(batches, data.live_state(self.settings), svg, self._paces(batches))
        return HTMLResponse(html, headers=PAGE_HEADERS)

    def overview_state(self, request: Request) -> Response:
        batches = data.recent_batches(self.url)
        usage = data.throttle_minutes(self.url)
        paces = self._paces(batches)
        body = {
            "version": pages.overview_version(batches),
            "batches": [batch_json(b, paces.get(b.id, "")) for b in batches],
            "throttle": throttle_json(data.live_state(self.settings), usage, self.settings),
        }
        return JSONResponse(body, headers=STATE_HEADERS)

    def throttle_chart(self, request: Request) -> Response:
        _, svg = self._chart()
        return Response(svg, media_type="image/svg+xml", headers=STATE_HEADERS)

    def _detail(self, request: Request) -> BatchDetail | None:
        batch_id = parse_batch_id(request.path_params["batch_id"])
        return data.batch_detail(self.url, batch_id) if batch_id is not None else None

    def batch_page(self, request: Request) -> Response:
        detail = self._detail(request)
        if detail is None:
            page = pages.not_found_page(f"No batch {request.path_params['batch_id']}.")
            return HTMLResponse(page, status_code=404, headers=PAGE_HEADERS)
        page = pages.batch_page(detail, self._usage(detail.summary.id))
        return HTMLResponse(page, headers=PAGE_HEADERS)

    def batch_state(self, request: Request) -> Response:
        detail = self._detail(request)
        if detail is None:
            return JSONResponse({"error": "no such batch"}, status_code=404, headers=STATE_HEADERS)
        body = detail_json(detail, self._usage(detail.summary.id))
        return JSONResponse(body, headers=STATE_HEADERS)

    def _usage(self, batch_id: int) -> str:
        """The batch's tokens by the ledger and their dollars, and its budget if any."""
        found = shapes.batch_usage(self.url, [batch_id], self.settings.price_for)[batch_id]
        prompt, completion = found["usage"]["input_tokens"], found["usage"]["output_tokens"]
        text = usage_text(prompt, completion, found["usd"])
        split = shapes.attachment_split(found["attachments"])
        if split is not None:
            text += f" (by attachment: {split})"
        with session_scope(self.url) as session:
            standing = budget.standing(session, batch_id, self.settings.price_for)
        return f"{text}; {standing.describe()}" if standing.budget else text

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.overview),
            Route("/state.json", self.overview_state),
            Route("/throttle.svg", self.throttle_chart),
            Route("/batches/{batch_id}", self.batch_page),
            Route("/batches/{batch_id}/state.json", self.batch_state),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
