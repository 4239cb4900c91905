"""The throttle chart: requests and tokens per minute against the limits, as one SVG.

Rendered here rather than in the browser so the page needs no chart library and the
numbers on screen are the ledger's, as :func:`jobs.dashboard_data.throttle_minutes`
summed them. Every bar carries its minute and value (``data-minute``, ``data-value``)
and a tooltip; colours are attributes, not CSS, so the same SVG reads the same inline
in the page and alone at ``/throttle.svg``.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from jobs.dashboard_data import MinuteUsage

#: The whole chart: two panels side by side, drawn at about the page's own scale.
WIDTH, GAP = 1120, 40
PANEL_W = (WIDTH - GAP) / 2
#: One panel: its title line, its plot, its time labels.
TITLE_H, PLOT_H, AXIS_H = 24, 130, 20
HEIGHT = TITLE_H + PLOT_H + AXIS_H
#: Room for the value labels left of a plot, and after it.
LEFT, RIGHT = 48, 8
BAR = "#4a90d9"
OVER = "#d9534f"
LIMIT = "#555"
GRID = "#ddd"
TEXT = "#333"


def short(n: int) -> str:
    """``800000`` → ``800k``: axis labels stay narrow."""
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + suffix
    return str(n)


def _panel(
    x0: float, title: str, unit: str, values: Sequence[int], limit: int, minutes: list[str]
) -> list[str]:
    left, right = x0 + LEFT, x0 + PANEL_W - RIGHT
    plot_w = right - left
    peak = max([limit, *values]) or 1
    scale = PLOT_H / (peak * 1.08)
    step = plot_w / max(len(values), 1)

    def y(value: float) -> float:
        return TITLE_H + PLOT_H - value * scale

    parts = [
        f'<text x="{x0:.1f}" y="15" font-size="14" font-weight="600" fill="{TEXT}">'
        f"{escape(title)}</text>",
        f'<line x1="{left:.1f}" y1="{y(0):.1f}" x2="{right:.1f}" y2="{y(0):.1f}" stroke="{GRID}"/>',
        f'<text x="{left - 6:.1f}" y="{y(0) + 4:.1f}" font-size="12" text-anchor="end" '
        f'fill="{TEXT}">0</text>',
    ]
    for i, (minute, value) in enumerate(zip(minutes, values, strict=True)):
        fill = OVER if value > limit else BAR
        parts.append(
            f'<rect x="{left + i * step + step * 0.1:.1f}" y="{y(value):.1f}" '
            f'width="{step * 0.8:.1f}" height="{value * scale:.1f}" fill="{fill}" '
            f'data-minute="{escape(minute)}" data-value="{value}">'
            f"<title>{escape(minute[11:16])} UTC: {value:,} {escape(unit)}</title></rect>"
        )
    parts += [
        f'<line x1="{left:.1f}" y1="{y(limit):.1f}" x2="{right:.1f}" y2="{y(limit):.1f}" '
        f'stroke="{LIMIT}" stroke-dasharray="5 4" data-limit="{limit}"/>',
        f'<text x="{left - 6:.1f}" y="{y(limit) + 4:.1f}" font-size="12" text-anchor="end" '
        f'fill="{TEXT}">{short(limit)}</text>',
    ]
    if minutes:
        base = TITLE_H + PLOT_H + 15
        for x, anchor, label in (
            (left, "start", minutes[0][11:16]),
            (left + plot_w / 2, "middle", minutes[len(minutes) // 2][11:16]),
            (right, "end", f"{minutes[-1][11:16]} UTC"),
        ):
            parts.append(
                f'<text x="{x:.1f}" y="{base:.1f}" font-size="12" text-anchor="{anchor}" '
                f'fill="{TEXT}">{escape(label)}</text>'
            )
    return parts


def throttle_svg(usage: Sequence[MinuteUsage], *, rpm: int, tpm: int) -> str:
    """Two panels, requests/min then tokens/min, each bar a minute of the ledger."""
    minutes = [u.start.strftime("%Y-%m-%dT%H:%MZ") for u in usage]
    requests = [u.requests for u in usage]
    tokens = [u.tokens for u in usage]
    body = [
        *_panel(0, f"Requests per minute (limit {rpm:,})", "requests", requests, rpm, minutes),
        *_panel(
            PANEL_W + GAP, f"Tokens per minute (limit {tpm:,})", "tokens", tokens, tpm, minutes
        ),
    ]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="100%" role="img" font-family="system-ui, sans-serif" '
        f'aria-label="Requests and tokens per minute over the last hour">'
        + "".join(body)
        + "</svg>"
    )
