"""What a run measured, and what the two runs mean side by side.

One :class:`RunResult` per run (stock Django, then connguard) and a
:class:`DemoResult` for both; from them the summary table (:func:`summary_rows`),
the one-sentence verdict (:func:`verdict`) and the JSON document (``as_dict``). The
terminal view, the JSON output and the HTML report all show these same figures.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .site.logs import MARKER

__all__ = [
    "DemoResult",
    "RunResult",
    "compact",
    "percentile",
    "request_errors",
    "summary_rows",
    "verdict",
]

# 'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  sorry,
# too many clients already' -> 'sorry, too many clients already'
_CONNECT_PREFIX = re.compile(
    r"(connection failed: )?connection to server (at|on) .*? failed: (FATAL:\s+)?"
)


def compact(text: str) -> str:
    """A reason for a table cell or a sentence: ``OperationalError: sorry, too many
    clients already`` loses the exception's type (the JSON keeps it)."""
    return re.sub(r"\b[A-Z]\w*(Error|Exception): ", "", text)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def request_errors(log: str) -> Counter[str]:
    """Why the site's requests failed, from its server log (one line each, written by
    :class:`connguard.demo.site.logs.OneLineFormatter`), counted by reason."""
    reasons: Counter[str] = Counter()
    for line in log.splitlines():
        _, marker, rest = line.partition(MARKER)
        if not marker:
            continue
        message, _, exc = rest.partition(" | ")
        if exc:
            reasons[_CONNECT_PREFIX.sub("", exc.strip())] += 1
        else:  # a 5xx response without an exception, e.g. connguard's 503
            reasons[message.strip().split(": /", 1)[0]] += 1
    return reasons


@dataclass
class RunResult:
    """One run's figures. Times are seconds from the start of the burst."""

    key: str
    """``stock`` or ``connguard``."""
    title: str
    settings: dict[str, Any]
    """What the site ran with: ``DATABASES["default"]`` (password masked), ``MIDDLEWARE``,
    the server's command line."""
    server: str
    processes: int
    requests: int
    concurrency: int
    ok: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    """Failed requests by what the client saw (``HTTP 500``, ``connection reset``)."""
    server_errors: Counter[str] = field(default_factory=Counter)
    """The server's reasons for its 5xx responses, from its log."""
    latencies: list[float] = field(default_factory=list)
    burst_seconds: float = 0.0
    quiet_seconds: float = 0.0
    peak_backends: int = 0
    backends_at_end: int = 0
    idle_in_transaction_at_end: int = 0
    connections_opened: int | None = None
    connections_opened_source: str = ""
    samples: list[dict[str, float]] = field(default_factory=list)
    """``t``, ``backends``, ``active``, ``idle``, ``idle_in_transaction``, ``other``."""
    pool_samples: list[dict[str, float]] = field(default_factory=list)
    """``t``, ``size``, ``in_use``, ``idle``, ``waiting``: connguard's run only."""
    pool: dict[str, int] | None = None
    """The pool's settings and figures (None for stock Django): ``min_size``,
    ``max_size``, ``processes``, ``peak_size``, ``peak_in_use``, ``peak_waiting``,
    ``size_at_end``, ``opened``."""
    at_end: list[dict[str, Any]] = field(default_factory=list)
    """The site's backends in ``pg_stat_activity`` at the end of the quiet period, as the
    report's ``SELECT`` showed them: state, seconds since their last query, the query."""

    @property
    def budget(self) -> int | None:
        """Most backends connguard allows this run: processes x ``max_size``."""
        return None if self.pool is None else self.pool["max_size"] * self.pool["processes"]

    def bound_text(self, size: str) -> str:
        """``max_size 10`` or, with several processes, ``max_size 10 x 2``."""
        assert self.pool is not None
        many = f" x {self.pool['processes']}" if self.pool["processes"] > 1 else ""
        return f"{size} {self.pool[size]}{many}"

    @property
    def floor(self) -> int | None:
        """Backends connguard keeps when idle: processes x ``min_size``."""
        return None if self.pool is None else self.pool["min_size"] * self.pool["processes"]

    def latency_ms(self) -> dict[str, float | None]:
        def ms(q: float) -> float | None:
            value = percentile(self.latencies, q)
            return None if value is None else round(value * 1000.0, 1)

        return {"p50": ms(0.5), "p99": ms(0.99), "max": ms(1.0)}

    def why_failed(self) -> list[dict[str, Any]]:
        """Failed requests grouped by reason, most frequent first. An HTTP 5xx gets the
        server's most frequent reason for it, which the client cannot see."""
        out = []
        server_reason = self.server_errors.most_common(1)[0][0] if self.server_errors else None
        for what, count in self.failures.most_common():
            why = what
            if what.startswith("HTTP 5") and server_reason is not None:
                why = f"{what}: {server_reason}"
            out.append({"why": why, "count": count})
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "server": self.server,
            "processes": self.processes,
            "settings": self.settings,
            "requests": self.requests,
            "concurrency": self.concurrency,
            "ok": self.ok,
            "failed": self.failed,
            "failures": self.why_failed(),
            "server_errors": dict(self.server_errors.most_common()),
            "latency_ms": self.latency_ms(),
            "burst_seconds": round(self.burst_seconds, 2),
            "quiet_seconds": round(self.quiet_seconds, 2),
            "peak_backends": self.peak_backends,
            "backends_at_end": self.backends_at_end,
            "idle_in_transaction_at_end": self.idle_in_transaction_at_end,
            "connections_opened": self.connections_opened,
            "connections_opened_source": self.connections_opened_source,
            "pool": self.pool,
            "budget": self.budget,
            "at_end": self.at_end,
            "samples": self.samples,
            "pool_samples": self.pool_samples,
        }


@dataclass
class DemoResult:
    """Both runs, the server they shared, and what the demo was asked to do."""

    version: str
    postgres: dict[str, Any]
    options: dict[str, Any]
    runs: list[RunResult]
    elapsed_seconds: float = 0.0
    report: str | None = None

    def run(self, key: str) -> RunResult:
        return next(r for r in self.runs if r.key == key)

    def as_dict(self) -> dict[str, Any]:
        return {
            "connguard_version": self.version,
            "postgres": self.postgres,
            "options": self.options,
            "verdict": verdict(self),
            "summary": [
                {
                    "figure": label,
                    **{run.key: text for run, text in zip(self.runs, texts, strict=True)},
                }
                for label, *texts in summary_rows(self)
            ],
            "runs": {run.key: run.as_dict() for run in self.runs},
            "elapsed_seconds": round(self.elapsed_seconds, 1),
            "report": self.report,
        }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _failed_text(run: RunResult) -> str:
    if not run.failed:
        return f"0 of {run.requests}"
    reasons = "; ".join(
        f"{item['count']} {item['why']}" if len(run.failures) > 1 else item["why"]
        for item in run.why_failed()[:2]
    )
    return f"{run.failed} of {run.requests} ({reasons})"


def summary_rows(result: DemoResult) -> list[tuple[str, ...]]:
    """The side-by-side table: one row per figure, one column per run (texts)."""
    max_connections = result.postgres["max_connections"]
    quiet = result.options["quiet_seconds"]
    rows: list[tuple[str, ...]] = [("", *(run.title for run in result.runs))]

    def peak(run: RunResult) -> str:
        bound = (
            f"max_size {run.pool['max_size']}"
            + (f" x {run.processes}" if run.processes > 1 else "")
            if run.pool
            else f"max_connections {max_connections}"
        )
        return f"{run.peak_backends} (of {bound})"

    def end(run: RunResult) -> str:
        floor = f" (min_size {run.floor})" if run.floor is not None else ""
        return f"{run.backends_at_end}{floor}"

    def latency(run: RunResult) -> str:
        ms = run.latency_ms()
        return f"{_ms(ms['p50'])} / {_ms(ms['p99'])}"

    def opened(run: RunResult) -> str:
        return "-" if run.connections_opened is None else str(run.connections_opened)

    rows.append(("peak backends", *(peak(run) for run in result.runs)))
    rows.append((f"backends after {quiet:g} s quiet", *(end(run) for run in result.runs)))
    rows.append(("failed requests", *(_failed_text(run) for run in result.runs)))
    rows.append(("latency p50 / p99", *(latency(run) for run in result.runs)))
    rows.append(("connections opened", *(opened(run) for run in result.runs)))
    return rows


def verdict(result: DemoResult) -> str:
    """One sentence: did stock Django keep or exhaust connections, and did connguard
    stay within its bounds and give them back?"""
    stock, cg = result.run("stock"), result.run("connguard")
    quiet = f"{result.options['quiet_seconds']:g} s"
    budget, floor = cg.budget or 0, cg.floor or 0
    cg_bounded = cg.peak_backends <= budget
    cg_returned = cg.backends_at_end <= floor
    stock_kept = stock.backends_at_end > budget
    stock_parts = [f"stock Django peaked at {stock.peak_backends} backends"]
    if stock_kept:
        stock_parts.append(f"still held {stock.backends_at_end} of them {quiet} after the burst")
    else:
        stock_parts.append(f"held {stock.backends_at_end} after {quiet}")
    if stock.failed:
        reason = compact(stock.why_failed()[0]["why"])
        stock_parts.append(f"and failed {stock.failed} of {stock.requests} requests ({reason})")
    else:
        stock_parts.append("and failed no request")
    max_text = cg.bound_text("max_size") if cg.pool else f"max_size {budget}"
    min_text = cg.bound_text("min_size") if cg.pool else f"min_size {floor}"
    cg_text = (
        f"connguard peaked at {cg.peak_backends} ({max_text}), "
        f"was back to {cg.backends_at_end} ({min_text}) and failed "
        + (f"{cg.failed} of {cg.requests}" if cg.failed else "none")
    )
    if cg_bounded and cg_returned and not cg.failed:
        lead = "the leak, reproduced and fixed: " if stock_kept or stock.failed else ""
        return _sentence(f"{lead}{', '.join(stock_parts[:-1])} {stock_parts[-1]}; {cg_text}.")
    problems = [
        text
        for bad, text in (
            (not cg_bounded, f"exceeded max_size ({cg.peak_backends} > {budget})"),
            (not cg_returned, f"kept {cg.backends_at_end} backends (min_size {floor})"),
            (bool(cg.failed), f"failed {cg.failed} requests"),
        )
        if bad
    ]
    return _sentence(
        f"in this run connguard did not hold its bounds: it {', '.join(problems)}; "
        f"{', '.join(stock_parts[:-1])} {stock_parts[-1]}."
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]
