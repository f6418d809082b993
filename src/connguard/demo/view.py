"""What the terminal shows while the demo runs, and the summary at the end.

Two views with one interface: :class:`LiveView` redraws a small panel in place (rich)
for a person at a terminal; :class:`PlainView` prints a line every few seconds, for
logs and CI (``--no-live``, or when the output is not a terminal). rich is imported
only by :class:`LiveView` and :func:`rich_summary`, so that the plain output needs
nothing beyond the standard library.

Every progress line leads with the run's peak so far, then the sample of the moment:
backends come and go between samples (stock Django's garbage collector closes some
mid-burst), and a log that shows a dip as the burst's figure misleads. Every run
prints a ``burst done`` line with its peak, however short the burst.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TextIO

from .figures import DemoResult, RunResult, compact, summary_rows, verdict
from .sampler import PoolGauges, Sample

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

__all__ = [
    "LiveState",
    "LiveView",
    "PlainView",
    "View",
    "plain_summary",
    "rich_summary",
    "sparkline",
    "sparkline_scale",
]

SPARK = "▁▂▃▄▅▆▇█"
PLAIN_EVERY = 2.0
"""Seconds between progress lines of the plain view."""


@dataclass(frozen=True)
class LiveState:
    """One moment of a run, as the views show it."""

    key: str
    title: str
    phase: str
    """``burst`` or ``quiet``."""
    elapsed: float
    quiet_left: float | None
    sample: Sample | None
    history: list[int]
    """Recent backend counts, oldest first, for the sparkline."""
    max_connections: int
    pool: PoolGauges | None
    requests: int
    done: int
    failed: int
    failures: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    """Most backends sampled since the burst began."""
    history_seconds: float = 0.0
    """The time ``history`` covers."""
    final: bool = False
    """The last state of its phase (the burst is over): always shown."""


class View(Protocol):
    def note(self, text: str) -> None:
        """A step of the demo (starting the server, creating the site...)."""

    def start_run(self, title: str, description: str, index: int, count: int) -> None: ...

    def update(self, state: LiveState) -> None:
        """Called every quarter second during a run."""

    def end_run(self, result: RunResult) -> None: ...

    def close(self) -> None: ...


def sparkline(values: list[int], top: int, width: int = 40) -> str:
    """``values`` as at most ``width`` block characters, ``▁`` for 0 up to ``█`` for
    ``top``. With more values than columns, each column shows the largest value of
    its share, so that a peak is never averaged or sampled away."""
    if not values:
        return ""
    per = -(-len(values) // width)  # ceiling division
    columns = [max(values[i : i + per]) for i in range(0, len(values), per)]
    top = max(top, 1)
    return "".join(
        SPARK[min(len(SPARK) - 1, max(0, round(v / top * (len(SPARK) - 1))))] for v in columns
    )


def sparkline_scale(state: LiveState) -> str:
    """What the sparkline's height and width mean."""
    return f"0 to {state.max_connections} (max_connections), last {state.history_seconds:.0f} s"


def _backends_text(state: LiveState) -> str:
    """``backends peak 39/40, now 7 (active 3, idle 4)``: the run's peak so far, then
    the sample of the moment by state."""
    s = state.sample
    if s is None:
        return "backends -"
    parts = [f"active {s.active}", f"idle {s.idle}"]
    if s.idle_in_transaction:
        parts.append(f"idle in transaction {s.idle_in_transaction}")
    if s.other:
        parts.append(f"starting {s.other}")
    peak = max(state.peak, s.backends)
    return f"backends peak {peak}/{state.max_connections}, now {s.backends} ({', '.join(parts)})"


def _pool_text(pool: PoolGauges | None) -> str:
    if pool is None:
        return "pool -"
    return (
        f"pool size {pool.size}/{pool.max_size * pool.processes} "
        f"(in use {pool.in_use}, idle {pool.idle}, waiting {pool.waiting})"
    )


def _requests_text(state: LiveState) -> str:
    text = f"requests {state.done}/{state.requests} done, {state.failed} failed"
    if state.failures:
        text += " (" + ", ".join(f"{k} x{v}" for k, v in state.failures.items()) + ")"
    return text


def _phase_text(state: LiveState) -> str:
    if state.phase == "burst":
        if state.final:
            return f"burst done in {state.elapsed:.1f} s"
        return f"burst {state.elapsed:5.1f} s"
    return f"quiet {state.quiet_left or 0:5.1f} s left"


def _run_line(result: RunResult) -> str:
    return (
        f"{result.title}: peak {result.peak_backends} backends, "
        f"{result.backends_at_end} after {result.quiet_seconds:g} s quiet; "
        f"{result.ok} ok, {result.failed} failed; burst {result.burst_seconds:.1f} s"
    )


class PlainView:
    """One line per step, and a progress line every ``every`` seconds of a run."""

    def __init__(self, stream: TextIO, every: float = PLAIN_EVERY) -> None:
        self.stream = stream
        self.every = every
        self._last = 0.0
        self._phase = ""

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        self._print(f"connguard demo: {text}")

    def start_run(self, title: str, description: str, index: int, count: int) -> None:
        # The first progress line comes ``every`` seconds into the burst, not at 0 s.
        self._phase, self._last = "burst", time.monotonic()
        self._print(f"run {index + 1}/{count}: {title}: {description}")

    def update(self, state: LiveState) -> None:
        now = time.monotonic()
        if not state.final and state.phase == self._phase and now - self._last < self.every:
            return
        self._phase, self._last = state.phase, now
        self._print(
            f"  [{state.key}] {_phase_text(state)}  {_backends_text(state)}  "
            f"{_pool_text(state.pool)}  {_requests_text(state)}"
        )

    def end_run(self, result: RunResult) -> None:
        self._print(f"  {_run_line(result)}")

    def close(self) -> None:
        pass


class LiveView:
    """A panel redrawn in place four times a second (rich's ``Live``)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._live: Live | None = None
        self._heading = ""

    def note(self, text: str) -> None:
        from rich.text import Text  # noqa: PLC0415

        self.console.print(Text.assemble(("connguard demo: ", "dim"), text))

    def start_run(self, title: str, description: str, index: int, count: int) -> None:
        from rich.live import Live  # noqa: PLC0415
        from rich.text import Text  # noqa: PLC0415

        self._heading = f"run {index + 1}/{count}: {title}"
        self.console.print(Text.assemble((self._heading, "bold"), ": ", description))
        self._live = Live(
            self._render(None), console=self.console, refresh_per_second=4, transient=True
        )
        self._live.start()

    def _render(self, state: LiveState | None) -> RenderableType:
        from rich.panel import Panel  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
        from rich.text import Text  # noqa: PLC0415

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        if state is None:
            grid.add_row("starting", "the web server")
            return Panel(grid, title=self._heading, title_align="left")
        spark = Text(sparkline(state.history, state.max_connections), style="cyan")
        top = Text.assemble(_backends_text(state).removeprefix("backends "))
        grid.add_row("PostgreSQL backends", top)
        grid.add_row("", Text.assemble(spark, "  ", (sparkline_scale(state), "dim")))
        if state.pool is not None:
            grid.add_row("connguard pool", _pool_text(state.pool).removeprefix("pool "))
        else:
            grid.add_row("pool", "none (stock Django: one connection per thread)")
        failed = Text(f"{state.failed} failed", style="red" if state.failed else "green")
        line = Text.assemble(f"{state.done}/{state.requests} done, ", failed)
        if state.failures:
            line.append(" (" + ", ".join(f"{k} x{v}" for k, v in state.failures.items()) + ")")
        grid.add_row("requests", line)
        title = f"{self._heading} · {_phase_text(state).strip()}"
        return Panel(grid, title=title, title_align="left")

    def update(self, state: LiveState) -> None:
        if self._live is not None:
            self._live.update(self._render(state))

    def end_run(self, result: RunResult) -> None:
        self.close()
        self.console.print(f"  {_run_line(result)}", highlight=False, markup=False)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def plain_summary(result: DemoResult, stream: TextIO) -> None:
    """The side-by-side table and the verdict as plain text, aligned in columns."""
    rows = [tuple(compact(cell) for cell in row) for row in summary_rows(result)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(file=stream)
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  " + "   ".join(cells).rstrip(), file=stream)
    print(file=stream)
    print(verdict(result), file=stream)


def rich_summary(result: DemoResult, console: Console) -> None:
    """The same table as :func:`plain_summary`, drawn by rich."""
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    rows = summary_rows(result)
    table = Table(title="stock Django vs connguard", title_justify="left")
    table.add_column("", style="bold")
    for title in rows[0][1:]:
        table.add_column(title)
    for row in rows[1:]:
        table.add_row(*(Text(compact(cell)) for cell in row))
    console.print()
    console.print(table)
    console.print(verdict(result), style="bold", highlight=False, markup=False)
