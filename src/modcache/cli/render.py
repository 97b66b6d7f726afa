"""How the core CLI shows things: a sync report, the status summary, a load-dir summary, a progress bar.

Pure formatting: functions take the engine's own objects (``plan.Report``, the status record) and return lines,
so what people read is the plan as the engine computed it.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TextIO

from modcache import modules, plan

DEFAULT_ITEM_LIMIT = 50
PROGRESS_MIN_ITEMS = 500


def counts(values: Mapping[plan.Reason, int]) -> str:
    """The classic four reasons always, the corruption reasons when they occurred."""
    shown = [r for r in plan.Reason if r in plan.CLASSIC_REASONS or values.get(r, 0)]
    return ", ".join(f"{values.get(reason, 0)} {reason.value}" for reason in shown)


def plan_lines(the_plan: plan.Plan, *, limit: int = DEFAULT_ITEM_LIMIT) -> list[str]:
    """The plan's items (at most ``limit``, then how many more) and its rejected inputs with path and reason."""
    lines = [f"plan: {counts(the_plan.counts())} ({len(the_plan.items)} items)"]
    lines += [f"  {item}" for item in the_plan.items[:limit]]
    if len(the_plan.items) > limit:
        lines.append(f"  … and {len(the_plan.items) - limit} more")
    lines += [f"  {repair}" for repair in the_plan.repairs]
    lines += rejected_lines(the_plan.rejected)
    return lines


def rejected_lines(rejected: Sequence[modules.Rejected]) -> list[str]:
    if not rejected:
        return []
    return [f"rejected: {len(rejected)} (left as they are in the cache)"] + [f"  {r}" for r in rejected]


def report_lines(report: plan.Report, *, limit: int = DEFAULT_ITEM_LIMIT) -> list[str]:
    """A sync report for people: the plan, then what was applied (or that nothing was, for a dry run)."""
    lines = plan_lines(report.plan, limit=limit)
    if report.dry_run:
        lines.append("dry run: nothing written")
    else:
        lines.append(f"applied: {counts(report.applied)} ({report.repaired} writes)")
    if report.superseded:
        lines.append(f"superseded: {report.superseded} (a newer write landed first)")
    if report.vanished:
        lines.append(f"vanished: {report.vanished} (no longer live modules when read)")
    lines.append(
        f"source {report.source_count} modules ({report.digest}), cache {report.cached_count} modules, "
        f"{report.duration_s:.3f} s"
    )
    return lines


def sync_line(report: plan.Report, trigger: str, *, now: datetime.datetime) -> str:
    """One line per sync in watch mode: when, why, what the plan said, what was written, how long it took."""
    kind = "full" if report.full else "paths"
    return (
        f"{now.isoformat(timespec='seconds')} sync ({kind}, {trigger}): {report.plan.describe()}; "
        f"{report.repaired} written in {report.duration_s * 1000:.1f} ms"
    )


def status_lines(
    report: plan.Report, *, record: Mapping[str, str], generation: int, prefix: str, now: datetime.datetime
) -> list[str]:
    """``modcache status``: source vs cache counts, drift by reason, the last sync's record, the generation."""
    drift = report.plan.counts()
    lines = [
        f"source:    {report.source_count} live modules, {len(report.plan.rejected)} rejected ({report.digest})",
        f"cache:     {report.cached_count} modules under {prefix!r}, generation {generation}",
        f"drift:     {counts(drift) if any(drift.values()) else 'none'}",
    ]
    lines += [f"  {item}" for item in report.plan.items[:DEFAULT_ITEM_LIMIT]]
    lines += rejected_lines(report.plan.rejected)
    lines += last_sync_lines(record, now=now)
    return lines


def last_sync_lines(record: Mapping[str, str], *, now: datetime.datetime) -> list[str]:
    if not record:
        return ["last sync: none recorded"]
    lines = ["last sync:"]
    for key in sorted(record):
        lines.append(f"  {key}: {record[key]}{_age(record[key], now) if key.endswith('_at') else ''}")
    return lines


def _age(value: str, now: datetime.datetime) -> str:
    try:
        then = datetime.datetime.fromisoformat(value)
        seconds = (now - then).total_seconds()
    except (TypeError, ValueError):
        return ""
    return f" ({seconds:.0f} s ago)"


def load_lines(
    directory: str, changed: Iterable[str], unchanged: int, rejected: Sequence[tuple[str, str]]
) -> list[str]:
    changed = list(changed)
    lines = [f"wrote {path}" for path in changed]
    lines += [f"rejected {path!r}: {reason}" for path, reason in rejected]
    lines.append(
        f"loaded {len(changed) + unchanged} modules from {directory} "
        f"({len(changed)} changed, {unchanged} unchanged), {len(rejected)} rejected"
    )
    return lines


class ProgressBar:
    """A one-line progress bar for ``Engine.full_resync(progress=...)``, redrawn at most 10 times a second.

    Plans of fewer than ``min_items`` items finish too fast to need one: nothing is drawn for them.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        min_items: int = PROGRESS_MIN_ITEMS,
        width: int = 30,
        min_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._min_items = min_items
        self._width = width
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._last_draw = float("-inf")
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = self._clock()
        if total < self._min_items or (done < total and now - self._last_draw < self._min_interval_s):
            return
        self._last_draw = now
        filled = self._width * done // total if total else self._width
        bar = "#" * filled + "." * (self._width - filled)
        self._stream.write(f"\rsyncing [{bar}] {done}/{total}")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
