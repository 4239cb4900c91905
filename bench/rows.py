"""What a scenario returns: one row of measured numbers and the targets it met or missed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: A raw number as reported: counts, seconds, percentages, or a short text.
Metric = int | float | str | None


@dataclass(frozen=True)
class Target:
    """One stated goal of a row and whether the measurement met it."""

    label: str
    met: bool
    detail: str = ""


@dataclass
class Row:
    """The outcome of one scenario run.

    ``metrics`` holds every raw number under a stable key; the summary table reads the
    keys listed in :data:`SUMMARY_KEYS` and the detail section prints all of them.
    ``error`` is set when the scenario failed part-way; whatever was measured before the
    failure stays in ``metrics``.
    """

    name: str
    title: str
    description: str = ""
    metrics: dict[str, Metric] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def target(self, label: str, met: bool, detail: str = "") -> None:
        """Record one target and whether it was met."""
        self.targets.append(Target(label, met, detail))

    def as_dict(self) -> dict[str, object]:
        """The row as plain data (for JSON or further processing)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Row:
        """The row :meth:`as_dict` gave (read back from JSON)."""
        fields = dict(data)
        fields["targets"] = [Target(**t) for t in data["targets"]]
        return cls(**fields)

    @property
    def missed(self) -> list[Target]:
        return [t for t in self.targets if not t.met]


#: Summary-table columns: (metric key, column heading).
SUMMARY_KEYS: tuple[tuple[str, str], ...] = (
    ("workers", "workers"),
    ("limits", "limits"),
    ("requests", "requests"),
    ("elapsed_s", "elapsed s"),
    ("steady_pct_of_binding", "steady % of binding"),
    ("sim_max_requests_in_window", "max req / 60 s"),
    ("sim_max_tokens_in_window", "max tok / 60 s"),
    ("sim_rate_limited", "429s"),
    ("sim_duplicate_bodies", "dup bodies"),
)
