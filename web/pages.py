"""The dashboard's HTML, rendered on the server from :mod:`jobs.dashboard_data`.

Every value from the database (a batch's name, a job's error, a validation message)
goes through :func:`esc`: batch names and provider errors are other people's text.
The live parts carry ``data-field`` (and a row its ``data-batch``) so that
``static/dashboard.js`` can update them in place from the JSON state; ``<main>``
carries the URL of that state and the *version* of its layout (see
:func:`overview_version`), which tells the script when to fetch the page again
instead of patching numbers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from html import escape
from typing import Any

from jobs.dashboard_data import (
    BATCH_LIST_LIMIT,
    FAILED_LIST_LIMIT,
    BatchDetail,
    BatchSummary,
    LiveState,
)
from jobs.shapes import batch_public_id

#: Files a batch page links to, with what each holds.
FILE_LINKS = (
    ("input_file_id", "Input", "the uploaded requests"),
    ("output_file_id", "Output", "succeeded requests"),
    ("error_file_id", "Errors", "failed, cancelled and expired requests"),
)


def esc(value: object) -> str:
    return escape(str(value), quote=True)


def duration(seconds: float) -> str:
    """``3725.2`` → ``1 h 02 min``: two units at most, as a person reads an elapsed time."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def stamp(moment: dt.datetime | None) -> str:
    if moment is None:
        return ""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pause_text(state: LiveState) -> str:
    if state.redis_error:
        return "unknown (Redis unreachable)"
    if state.paused_for_s is None:
        return "none"
    return f"{state.paused_for_s:.1f} s left (the provider answered 429)"


def maybe(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def overview_version(batches: Iterable[BatchSummary]) -> str:
    """Changes when the list's rows do (a new batch): numbers alone are patched in place."""
    return "batches:" + ",".join(str(b.id) for b in batches)


def batch_version(detail: BatchDetail) -> str:
    """Changes when a batch page's sections do: status (its stamps), failures, files."""
    s = detail.summary
    return "|".join(
        str(part)
        for part in (
            s.status,
            min(s.failed, FAILED_LIST_LIMIT),
            detail.output_file_id,
            detail.error_file_id,
            len(detail.validation_errors),
        )
    )


def layout(title: str, main: str, *, state_url: str, version: str) -> str:
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · batch-infer</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head>
<body>
<header><a class="home" href="/">batch-infer</a>
<span id="updated" class="muted" aria-live="polite"></span></header>
<main data-state="{esc(state_url)}" data-version="{esc(version)}">
{main}
</main>
</body>
</html>
"""


def status_badge(status: str) -> str:
    return f'<span class="status s-{esc(status)}" data-field="status">{esc(status)}</span>'


def progress_bar(b: BatchSummary) -> str:
    """A stacked bar: succeeded, failed, cancelled, then the running ones, of the total."""
    parts = []
    for part in ("succeeded", "failed", "cancelled", "running"):
        count = getattr(b, part)
        width = 100 * count / b.total if b.total else 0
        parts.append(
            f'<span class="p-{part}" data-part="{part}" style="width:{width:.2f}%"></span>'
        )
    label = f"{b.done:,} of {b.total:,} done"
    return f'<div class="bar" role="img" aria-label="{esc(label)}">{"".join(parts)}</div>'


def _count(field: str, value: int) -> str:
    return f'<span data-field="{field}">{value:,}</span>'


def batch_row(b: BatchSummary, pace: str = "") -> str:
    public = batch_public_id(b.id)
    return f"""<tr data-batch="{b.id}">
<td><a href="/batches/{esc(public)}">{esc(public)}</a></td>
<td class="name">{esc(b.name)}</td>
<td>{status_badge(b.status)}</td>
<td class="progress">{progress_bar(b)}</td>
<td class="num">{_count("done", b.done)} / {_count("total", b.total)}</td>
<td class="num">{_count("queued", b.queued)}</td>
<td class="num">{_count("running", b.running)}</td>
<td class="num">{_count("succeeded", b.succeeded)}</td>
<td class="num">{_count("failed", b.failed)}</td>
<td class="num">{_count("cancelled", b.cancelled)}</td>
<td class="num"><span data-field="elapsed">{esc(duration(b.elapsed_s))}</span></td>
<td class="num pace"><span data-field="pace">{esc(pace)}</span></td>
</tr>"""


def throttle_section(state: LiveState, chart_svg: str) -> str:
    circuit = state.circuit or ""
    hidden = "" if circuit else " hidden"
    redis = (
        f'<p class="alert">Redis could not be read: {esc(state.redis_error)}</p>'
        if state.redis_error
        else ""
    )
    return f"""<section id="throttle">
<h2>Throttle</h2>
<dl class="live">
<div><dt>Backlog (queued)</dt><dd data-field="backlog">{state.backlog:,}</dd></div>
<div><dt>Running</dt><dd data-field="running">{state.running:,}</dd></div>
<div><dt>Calls in flight</dt><dd data-field="in_flight">{state.in_flight:,}</dd></div>
<div><dt>Workers alive</dt><dd data-field="workers">{maybe(state.workers)}</dd></div>
<div><dt>Pause after a 429</dt><dd data-field="pause">{esc(pause_text(state))}</dd></div>
</dl>
<p class="alert" data-field="circuit"{hidden}>{esc(circuit)}</p>
{redis}
<div id="chart" class="chart">{chart_svg}</div>
<p class="muted">Calls started per minute over the last hour, from the ledger (a call's
tokens count once it is answered), against the key's limits (INFERENCE_RPM and
INFERENCE_TPM; with INFERENCE_POOL, every attachment's added up).</p>
</section>"""


def overview(
    batches: list[BatchSummary],
    state: LiveState,
    chart_svg: str,
    paces: dict[int, str] | None = None,
) -> str:
    paces = paces or {}
    rows = "\n".join(batch_row(b, paces.get(b.id, "")) for b in batches) or (
        '<tr><td colspan="12" class="muted">No batches yet.</td></tr>'
    )
    main = f"""<section id="batches">
<h2>Batches</h2>
<table class="batches">
<thead><tr><th>Batch</th><th>Name</th><th>Status</th><th>Progress</th><th class="num">Done</th>
<th class="num">Queued</th><th class="num">Running</th><th class="num">Succeeded</th>
<th class="num">Failed</th><th class="num">Cancelled</th><th class="num">Elapsed</th>
<th class="num">Pace</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<p class="muted">Newest first; the newest {BATCH_LIST_LIMIT} are listed.</p>
</section>
{throttle_section(state, chart_svg)}"""
    return layout("Dashboard", main, state_url="/state.json", version=overview_version(batches))


def _files(detail: BatchDetail) -> str:
    items = []
    for attr, label, what in FILE_LINKS:
        file_id = getattr(detail, attr)
        if file_id:
            href = f"/v1/files/{file_id}/content"
            items.append(
                f'<li>{esc(label)} ({esc(what)}): <a href="{esc(href)}" download '
                f'data-file="{esc(attr)}">{esc(file_id)}</a></li>'
            )
    if not items:
        return '<p class="muted">No files yet: they are made when the batch ends.</p>'
    return "<ul>" + "".join(items) + "</ul>"


def _validation_errors(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return ""
    rows = "".join(
        f"<tr><td class=num>{esc(e.get('line') or '')}</td><td>{esc(e.get('code') or '')}</td>"
        f"<td>{esc(e.get('param') or '')}</td><td>{esc(e.get('message') or '')}</td></tr>"
        for e in errors
    )
    return f"""<section id="validation-errors">
<h2>Validation errors</h2>
<table><thead><tr><th class="num">Line</th><th>Code</th><th>Field</th><th>Message</th></tr></thead>
<tbody>{rows}</tbody></table>
</section>"""


def _failed_jobs(detail: BatchDetail) -> str:
    total = detail.summary.failed
    if not total:
        return ""
    shown = len(detail.failed_jobs)
    note = (
        f"The first {shown:,} of {_count('failed', total)}, by job id."
        if total > shown
        else f"{_count('failed', total)} in all."
    )
    rows = "".join(
        f"""<tr data-job="{j.id}"><td class="num">{j.id}</td><td>{esc(j.custom_id)}</td>
<td>{esc(j.error_code or "")}</td><td class="num">{esc(j.error_status or "")}</td>
<td class="num">{j.attempts}</td><td class="error">{esc(j.last_error or "")}</td></tr>"""
        for j in detail.failed_jobs
    )
    return f"""<section id="failed-jobs">
<h2>Failed jobs</h2>
<p class="muted">{note}</p>
<table class="failed"><thead><tr><th class="num">Job</th><th>custom_id</th><th>Error code</th>
<th class="num">Provider status</th><th class="num">Attempts</th><th>Error</th></tr></thead>
<tbody>{rows}</tbody></table>
</section>"""


def batch_page(detail: BatchDetail, usage: str = "") -> str:
    b = detail.summary
    public = batch_public_id(b.id)
    counts = "".join(
        f"<div><dt>{label}</dt><dd>{_count(field, getattr(b, field))}</dd></div>"
        for field, label in (
            ("total", "Total"),
            ("done", "Done"),
            ("queued", "Queued"),
            ("running", "Running"),
            ("succeeded", "Succeeded"),
            ("failed", "Failed"),
            ("cancelled", "Cancelled"),
        )
    )
    stamps = "".join(
        f"<tr><th>{esc(name)}</th><td>{esc(stamp(moment))}</td></tr>"
        for name, moment in detail.timestamps
    )
    window = detail.completion_window or "none"
    main = f"""<section id="batch" data-batch="{b.id}">
<h1>{esc(public)} <span class="name">{esc(b.name)}</span> {status_badge(b.status)}</h1>
{progress_bar(b)}
<dl class="live">{counts}
<div><dt>Elapsed</dt><dd data-field="elapsed">{esc(duration(b.elapsed_s))}</dd></div></dl>
<p>Usage: <span data-field="usage">{esc(usage)}</span></p>
<p class="muted">Source {esc(detail.source)}, endpoint {esc(detail.endpoint)},
completion window {esc(window)}.</p>
</section>
{_validation_errors(detail.validation_errors)}
<section id="files">
<h2>Files</h2>
{_files(detail)}
</section>
{_failed_jobs(detail)}
<section id="timestamps">
<h2>Timestamps</h2>
<table class="stamps"><tbody>{stamps}</tbody></table>
</section>"""
    return layout(
        public,
        main,
        state_url=f"/batches/{public}/state.json",
        version=batch_version(detail),
    )


def not_found_page(what: str) -> str:
    main = f'<h1>Not found</h1><p>{esc(what)}</p><p><a href="/">Back to the dashboard</a></p>'
    return layout("Not found", main, state_url="", version="")
