"""The demo's HTML report: one self-contained file, readable offline, forever.

Everything is inline (styles, the sampled data as JSON, the script that draws the
charts as SVG): no fonts, scripts or images are fetched, so the file can be mailed,
attached to a bug report or opened on a machine without network. The tables are
HTML written here; only the charts need the script, and the page says so when
scripts are off.

The script marks what it drew, for people and for tests: each chart's ``<svg>``
gets ``data-points`` (samples drawn), and its backends line carries the sampled
counts in ``data-values``.

The legend lists only what some chart shows (a state no backend was ever in is left
out), and the page ends with how to adopt this: the settings diff from the user
report's settings to connguard's, and where the full checklist is. Links to the
documentation are the only addresses in the page, and only as ``<a href>``: nothing
is fetched.
"""

from __future__ import annotations

import html
import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import USER_REPORT
from .figures import DemoResult, RunResult, compact, summary_rows, verdict

__all__ = ["DJANGO_DOCS_URL", "adoption_diff", "render_report", "write_report"]

DJANGO_DOCS_URL = "https://github.com/connguard/connguard/blob/main/docs/django.md"
"""docs/django.md in the project's repository (``[project.urls]`` in pyproject.toml)."""

_CSS = """
:root { --fg:#212529; --muted:#6c757d; --line:#dee2e6; --bg:#fff; --panel:#f8f9fa;
        --active:#1c7ed6; --idle:#f59f00; --idletx:#e03131; --other:#adb5bd;
        --pool:#2f9e44; --limit:#e03131; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--fg); background: var(--bg); margin: 0 auto; max-width: 1320px;
       padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 10px; border-bottom: 1px solid var(--line);
     padding-bottom: 4px; }
h3 { font-size: 16px; margin: 18px 0 6px; }
.meta, .note { color: var(--muted); font-size: 13px; }
.verdict { font-size: 17px; background: var(--panel); border-left: 4px solid var(--pool);
           padding: 10px 14px; margin: 14px 0; }
.verdict.bad { border-left-color: var(--limit); }
table { border-collapse: collapse; font-size: 14px; }
th, td { text-align: left; padding: 6px 12px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
thead th { background: var(--panel); }
td.num { font-variant-numeric: tabular-nums; }
#summary-table td:first-child { font-weight: 600; white-space: nowrap; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr));
          gap: 20px; }
figure.chart { margin: 0; border: 1px solid var(--line); border-radius: 6px;
               padding: 10px 12px; }
figure.chart figcaption { font-weight: 600; margin-bottom: 4px; }
figure.chart .sub { color: var(--muted); font-weight: 400; font-size: 13px; }
svg.plot { width: 100%; height: auto; display: block; }
svg.plot text { font-size: 11px; fill: var(--muted); }
svg.plot .grid { stroke: #f1f3f5; }
svg.plot .axis { stroke: #adb5bd; }
svg.plot .burst { fill: #e7f5ff; }
svg.plot text.burst-label { fill: #1c7ed6; }
svg.plot .series-backends { fill: none; stroke: var(--fg); stroke-width: 1.6; }
svg.plot .series-pool-size { fill: none; stroke: var(--pool); stroke-width: 1.6;
                             stroke-dasharray: 5 3; }
svg.plot .limit { stroke: var(--limit); stroke-dasharray: 6 4; }
svg.plot .budget { stroke: var(--pool); stroke-dasharray: 2 3; }
svg.plot text.limit-label { fill: var(--limit); }
svg.plot text.budget-label { fill: var(--pool); }
svg.plot .hover-line { stroke: #495057; stroke-width: 1; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 16px; font-size: 13px; margin: 8px 0 0;
          padding: 0; list-style: none; }
.legend span.swatch { display: inline-block; width: 14px; height: 10px; margin-right: 5px;
                      vertical-align: -1px; }
.tooltip { font-size: 12px; color: var(--fg); min-height: 1.5em; margin-top: 4px; }
pre { background: var(--panel); padding: 10px 12px; overflow-x: auto; font-size: 13px;
      border-radius: 4px; }
code { font-size: 13px; }
.query { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
.settings { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr));
            gap: 20px; }
pre.diff .add { color: #2b8a3e; background: #ebfbee; display: inline-block; width: 100%; }
pre.diff .del { color: #c92a2a; background: #fff5f5; display: inline-block; width: 100%; }
.user-report { font-size: 14px; color: var(--muted); max-width: 60em; }
"""

# Draws one SVG chart per run from the JSON above it. Both charts share their scales
# (time from the start of the burst; backends up to max_connections), so they compare
# at a glance.
_SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("demo-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var W = 640, H = 300, L = 44, R = 14, T = 26, B = 34;
  var keys = Object.keys(data.runs);
  var xmax = 1, ymax = data.max_connections || 1;
  keys.forEach(function (k) {
    data.runs[k].samples.forEach(function (s) {
      xmax = Math.max(xmax, s.t);
      ymax = Math.max(ymax, s.backends);
    });
  });
  function x(t) { return L + (Math.max(0, t) / xmax) * (W - L - R); }
  function y(v) { return H - B - (v / ymax) * (H - T - B); }
  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (a) { node.setAttribute(a, attrs[a]); });
    if (parent) parent.appendChild(node);
    return node;
  }
  function label(text, attrs, parent) {
    var node = el("text", attrs, parent);
    node.textContent = text;
    return node;
  }
  function step(max, count) {
    var raw = max / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) {
      if (steps[i] * mag >= raw) return steps[i] * mag;
    }
    return 10 * mag;
  }
  function pts(samples, value) {
    return samples.map(function (s) {
      return x(s.t).toFixed(1) + "," + y(value(s)).toFixed(1);
    }).join(" ");
  }
  function area(samples, lower, upper) {
    var top = samples.map(function (s) {
      return x(s.t).toFixed(1) + "," + y(upper(s)).toFixed(1);
    });
    var bottom = samples.slice().reverse().map(function (s) {
      return x(s.t).toFixed(1) + "," + y(lower(s)).toFixed(1);
    });
    return top.concat(bottom).join(" ");
  }
  var layers = [
    ["active", "var(--active)", function (s) { return s.active; }],
    ["idle_in_transaction", "var(--idletx)", function (s) { return s.idle_in_transaction; }],
    ["idle", "var(--idle)", function (s) { return s.idle; }],
    ["other", "var(--other)", function (s) { return s.other; }]
  ];
  keys.forEach(function (key) {
    var run = data.runs[key];
    var svg = document.getElementById("chart-" + key);
    if (!svg) return;
    var samples = run.samples;
    var ys = step(ymax, 5), xs = step(xmax, 8), v, t;
    for (v = 0; v <= ymax + 1e-9; v += ys) {
      el("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), "class": "grid"}, svg);
      label(String(Math.round(v)), {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, svg);
    }
    for (t = 0; t <= xmax + 1e-9; t += xs) {
      label(Math.round(t * 10) / 10 + " s", {x: x(t), y: H - B + 16, "text-anchor": "middle"}, svg);
    }
    el("rect", {x: x(0), y: T, width: Math.max(1, x(run.burst_seconds) - x(0)),
                height: H - T - B, "class": "burst"}, svg);
    label("backends", {x: 4, y: 12, "text-anchor": "start"}, svg);
    el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, "class": "axis"}, svg);
    el("line", {x1: L, x2: L, y1: T, y2: H - B, "class": "axis"}, svg);
    var below = function () { return 0; };
    layers.forEach(function (layer) {
      var lower = below, value = layer[2];
      var upper = function (s) { return lower(s) + value(s); };
      el("polygon", {points: area(samples, lower, upper), fill: layer[1], "fill-opacity": 0.55,
                     "class": "layer-" + layer[0]}, svg);
      below = upper;
    });
    label("burst", {x: x(0) + 4, y: T - 4, "class": "burst-label"}, svg);
    el("line", {x1: L, x2: W - R, y1: y(data.max_connections), y2: y(data.max_connections),
                "class": "limit"}, svg);
    label("max_connections " + data.max_connections,
          {x: W - R - 4, y: y(data.max_connections) - 4, "text-anchor": "end",
           "class": "limit-label"}, svg);
    if (run.budget !== null) {
      el("line", {x1: L, x2: W - R, y1: y(run.budget), y2: y(run.budget), "class": "budget"}, svg);
      label("max_size " + run.budget, {x: W - R - 4, y: y(run.budget) - 4,
            "text-anchor": "end", "class": "budget-label"}, svg);
    }
    if (run.pool_samples.length) {
      el("polyline", {points: pts(run.pool_samples, function (s) { return s.size; }),
                      "class": "series-pool-size"}, svg);
    }
    el("polyline", {points: pts(samples, function (s) { return s.backends; }),
                    "class": "series-backends",
                    "data-values": samples.map(function (s) { return s.backends; }).join(",")},
       svg);
    svg.setAttribute("data-points", String(samples.length));
    svg.setAttribute("data-peak", String(Math.max.apply(null, samples.map(function (s) {
      return s.backends; }).concat([0]))));

    var hover = el("line", {x1: 0, x2: 0, y1: T, y2: H - B, "class": "hover-line",
                            visibility: "hidden"}, svg);
    var tip = document.getElementById("tip-" + key);
    svg.addEventListener("mousemove", function (event) {
      var box = svg.getBoundingClientRect();
      var px = (event.clientX - box.left) * W / box.width;
      var best = null;
      samples.forEach(function (s) {
        if (best === null || Math.abs(x(s.t) - px) < Math.abs(x(best.t) - px)) best = s;
      });
      if (!best) return;
      hover.setAttribute("x1", x(best.t));
      hover.setAttribute("x2", x(best.t));
      hover.setAttribute("visibility", "visible");
      var text = best.t.toFixed(1) + " s: " + best.backends + " backends (active " +
        best.active + ", idle " + best.idle + ", idle in transaction " +
        best.idle_in_transaction + ")";
      var pool = null;
      run.pool_samples.forEach(function (p) { if (p.t <= best.t) pool = p; });
      if (pool) {
        text += "; pool size " + pool.size + ", in use " + pool.in_use + ", waiting " +
          pool.waiting;
      }
      if (tip) tip.textContent = text;
    });
    svg.addEventListener("mouseleave", function () {
      hover.setAttribute("visibility", "hidden");
    });
  });
  document.documentElement.setAttribute("data-charts", "drawn");
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json_for_script(value: Any) -> str:
    """JSON that cannot end its ``<script>`` element early (``</script>`` in a query)."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _chart_data(result: DemoResult) -> dict[str, Any]:
    return {
        "max_connections": result.postgres["max_connections"],
        "runs": {
            run.key: {
                "title": run.title,
                "samples": run.samples,
                "pool_samples": run.pool_samples,
                "burst_seconds": round(run.burst_seconds, 3),
                "budget": run.budget,
            }
            for run in result.runs
        },
    }


def _summary_table(result: DemoResult) -> str:
    rows = summary_rows(result)
    head = "".join(
        f'<th data-run="{_e(run.key)}">{_e(title)}</th>'
        for run, title in zip(result.runs, rows[0][1:], strict=True)
    )
    body = "".join(
        "<tr>"
        + f"<td>{_e(row[0])}</td>"
        + "".join(
            f'<td class="num" data-run="{_e(run.key)}">{_e(compact(cell))}</td>'
            for run, cell in zip(result.runs, row[1:], strict=True)
        )
        + "</tr>"
        for row in rows[1:]
    )
    return (
        f'<table id="summary-table"><thead><tr><th></th>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


_LAYERS = (
    ("active", "var(--active)", "active (running a query)"),
    ("idle", "var(--idle)", "idle (connected, doing nothing)"),
    ("idle_in_transaction", "var(--idletx)", "idle in transaction"),
    ("other", "var(--other)", "starting"),
)
"""The stacked areas of a chart: sample key, colour, legend text."""


def _legend(result: DemoResult) -> str:
    """The legend, of what the charts show: a state no sample of any run was in draws
    nothing, and neither does the pool line without a pool."""
    items = [
        (key, f"background:{color};opacity:.6", text)
        for key, color, text in _LAYERS
        if any(sample.get(key, 0) for run in result.runs for sample in run.samples)
    ]
    items.append(("backends", "background:var(--fg);height:2px", "backends"))
    if any(run.pool_samples for run in result.runs):
        items.append(
            ("pool-size", "border-top:2px dashed var(--pool);height:0", "connguard pool size")
        )
    items.append(("burst", "background:#e7f5ff", "the burst"))
    entries = "".join(
        f'<li data-series="{_e(key)}"><span class="swatch" style="{style}"></span>{_e(text)}</li>'
        for key, style, text in items
    )
    return f'<ul class="legend">{entries}</ul>'


def _chart(run: RunResult) -> str:
    if run.pool is not None:
        sub = f"pool max_size {run.budget}, min_size {run.floor}"
    else:
        sub = "no pool: one connection per thread"
    return (
        f'<figure class="chart" data-run="{_e(run.key)}">'
        f'<figcaption>{_e(run.title)} <span class="sub">({_e(run.server)}; {_e(sub)})</span>'
        "</figcaption>"
        f'<svg id="chart-{_e(run.key)}" class="plot" viewBox="0 0 640 300" '
        f'role="img" aria-label="{_e(run.title)}: PostgreSQL backends over time" '
        f'data-run="{_e(run.key)}"></svg>'
        f'<div class="tooltip" id="tip-{_e(run.key)}">&nbsp;</div>'
        "</figure>"
    )


def _where_part(query: str) -> str:
    """The report's own view of a query: what follows WHERE (the page it checked)."""
    _, found, rest = query.partition("WHERE")
    return f"... WHERE {rest.strip()}" if found else query


def _at_end(run: RunResult) -> str:
    if not run.at_end:
        return f"<h3>{_e(run.title)}</h3><p>No backends left.</p>"
    shown = run.at_end[:10]
    rows = "".join(
        f"<tr><td>{_e(row['state'] or '-')}</td>"
        f'<td class="num">{_e(row["idle_seconds"] if row["idle_seconds"] is not None else "-")} s'
        f'</td><td class="query">{_e(_where_part(row["query"] or ""))}</td></tr>'
        for row in shown
    )
    more = (
        f'<p class="note">... and {len(run.at_end) - len(shown)} more.</p>'
        if len(run.at_end) > len(shown)
        else ""
    )
    return (
        f"<h3>{_e(run.title)}: {len(run.at_end)} backend{'s' if len(run.at_end) > 1 else ''}</h3>"
        '<table class="at-end"><thead><tr><th>state</th><th>since last query</th>'
        f"<th>last query</th></tr></thead><tbody>{rows}</tbody></table>{more}"
    )


def _failures(run: RunResult) -> str:
    if not run.failed:
        return f"<li><b>{_e(run.title)}</b>: none of {run.requests} requests failed.</li>"
    reasons = "".join(f"<li>{item['count']} x {_e(item['why'])}</li>" for item in run.why_failed())
    server = "".join(
        f"<li>{count} x {_e(why)}</li>" for why, count in run.server_errors.most_common(5)
    )
    server_part = (
        f'<p class="note">the server\'s log gave these reasons:</p><ul>{server}</ul>'
        if server
        else ""
    )
    return (
        f"<li><b>{_e(run.title)}</b>: {run.failed} of {run.requests} requests failed:"
        f"<ul>{reasons}</ul>{server_part}</li>"
    )


def _settings(result: DemoResult) -> str:
    blocks = []
    for run in result.runs:
        settings = run.settings
        server = settings.get("server")
        server_text = " ".join(server) if isinstance(server, list) else str(server)
        pretty = (
            "DATABASES = "
            + json.dumps(settings["DATABASES"], indent=4)
            .replace("true", "True")
            .replace("false", "False")
            .replace("null", "None")
            + "\nMIDDLEWARE = "
            + json.dumps(settings["MIDDLEWARE"])
        )
        blocks.append(
            f"<div><h3>{_e(run.title)}</h3><pre>{_e(pretty)}</pre>"
            f'<p class="note">served by <code>{_e(server_text)}</code>'
            f" ({run.processes} process{'es' if run.processes > 1 else ''})</p></div>"
        )
    pg = result.postgres
    options = result.options
    facts = [
        ("PostgreSQL", f"{pg['version']} ({pg['source']}) at {pg['host']}:{pg['port']}, "
                       f"user {pg['user']}, database {pg['database']}"),
        ("max_connections", pg["max_connections"]),
        ("burst", f"{options['requests']} image requests, {options['concurrency']} at a time, "
                  "each a permission query and a ~50 KB image"),
        ("quiet period", f"{options['quiet_seconds']:g} s of sampling after each burst"),
        ("connguard", result.version),
        ("Python", f"{platform.python_version()} on {platform.system()} {platform.machine()}"),
        ("Django", _django_version()),
    ]  # fmt: skip
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    return (
        f'<div class="settings">{"".join(blocks)}</div>'
        f'<h3>The demo</h3><table id="demo-facts">{rows}</table>'
    )


def _django_version() -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version("django")
    except Exception:
        return "unknown"


def render_report(result: DemoResult) -> str:
    """The whole report as one HTML document."""
    stock, cg = result.run("stock"), result.run("connguard")
    good = cg.failed == 0 and cg.peak_backends <= (cg.budget or 0)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    argv = _command_line(result)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>connguard demo: stock Django vs connguard</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>connguard demo: stock Django vs connguard</h1>
<p class="meta">{_e(when)} &middot; <code>{_e(argv)}</code> &middot;
{_e(result.options["requests"])} image requests, {_e(result.options["concurrency"])} at a
time, under {_e(stock.server)} &middot; finished in {result.elapsed_seconds:.0f} s</p>
<p class="verdict{"" if good else " bad"}" id="verdict">{_e(verdict(result))}</p>
<p class="user-report" id="user-report">{_e(USER_REPORT)} This page shows that site under
a burst of image loads, first with the user report's settings, then on connguard.</p>
</header>
<section id="summary">
<h2>Summary</h2>
{_summary_table(result)}
<p class="note">Backends are counted by PostgreSQL (<code>pg_stat_activity</code>), not by the
code under test. Latencies are of every response, failed ones too. Connections opened:
{_e(stock.connections_opened_source or "-")}.</p>
</section>
<section id="charts">
<h2>PostgreSQL backends over time</h2>
<p class="note">Sampled every {_e(_interval(stock))} s from the start of each burst through
its quiet period. Stock Django's connections belong to the threads that ran the views;
under ASGI those threads are gone after each request, and nobody closes their
connections: they stay until Python's garbage collector happens to run (the drops during
the burst), which an idle site never does. connguard gives each one back when its
request ends, for the next request to reuse, and closes the surplus after
<code>max_idle</code>.</p>
<div class="charts">{_chart(stock)}{_chart(cg)}</div>
{_legend(result)}
<noscript><p>The charts are drawn by a script in this page; enable JavaScript to see them.
The data is in the page's <code>demo-data</code> element.</p></noscript>
</section>
<section id="at-end">
<h2><code>pg_stat_activity</code> at the end of the quiet period</h2>
<p class="note">The user report's view: backends that stay, each with the last query it
ran (the permission check for one page image), long after the request finished.</p>
{_at_end(stock)}{_at_end(cg)}
</section>
<section id="failures">
<h2>Failed requests</h2>
<ul>{_failures(stock)}{_failures(cg)}</ul>
</section>
<section id="settings">
<h2>Settings used</h2>
{_settings(result)}
</section>
{_adopt(result)}
<script type="application/json" id="demo-data">{_json_for_script(_chart_data(result))}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _database(run: RunResult) -> dict[str, Any]:
    """The run's ``DATABASES["default"]`` ({} if the result does not hold it)."""
    database: dict[str, Any] = run.settings.get("DATABASES", {}).get("default", {})
    return database


def _pool(run: RunResult) -> dict[str, Any]:
    """The run's ``OPTIONS["pool"]`` ({} without one)."""
    pool = _database(run).get("OPTIONS", {}).get("pool")
    return pool if isinstance(pool, dict) else {}


def adoption_diff(result: DemoResult) -> list[str]:
    """From the user report's settings to connguard's, as a unified diff's lines
    (``+``, ``-`` or a space, then the line): what the connguard run changed, with the
    production values of the pool rather than the demo's shortened ``max_idle``."""
    stock = _database(result.run("stock"))
    cg = _database(result.run("connguard"))
    pool = _pool(result.run("connguard"))
    wanted = {
        "min_size": pool.get("min_size", 1),
        "max_size": pool.get("max_size", 10),
        "timeout": pool.get("timeout", 5),
    }
    pool_text = ", ".join(f'"{key}": {value}' for key, value in wanted.items())
    stock_engine = stock.get("ENGINE", "django.db.backends.postgresql")
    cg_engine = cg.get("ENGINE", "connguard.backends.postgresql")
    lines = [
        " DATABASES = {",
        '     "default": {',
        f'-        "ENGINE": "{stock_engine}",',
        f'+        "ENGINE": "{cg_engine}",',
        '         "NAME": ..., "USER": ..., "PASSWORD": ..., "HOST": ..., "PORT": ...,',
    ]
    if "CONN_MAX_AGE" in stock:
        lines.append(f'-        "CONN_MAX_AGE": {stock["CONN_MAX_AGE"]},')
    if stock.get("CONN_HEALTH_CHECKS"):
        lines.append('-        "CONN_HEALTH_CHECKS": True,')
    lines += [
        '         "OPTIONS": {',
        f'+            "pool": {{{pool_text}}},',
        "         },",
        "     },",
        " }",
        " INSTALLED_APPS = [",
        "     ...,",
        '+    "connguard.django",',
        " ]",
        " MIDDLEWARE = [",
        '+    "connguard.django.middleware.ConnguardMiddleware",  # first',
        "     ...,",
        " ]",
    ]
    return lines


def _adopt(result: DemoResult) -> str:
    """The page's last section: the settings diff, what each line buys, the docs."""
    diff = "\n".join(
        f'<span class="{"add" if line[0] == "+" else "del"}">{_e(line)}</span>'
        if line[0] in "+-"
        else _e(line)
        for line in adoption_diff(result)
    )
    shortened = [
        f"<code>{key}</code> ({_e(value)} s)"
        for key, value in _pool(result.run("connguard")).items()
        if key in ("max_idle", "housekeeping_interval")
    ]
    demo_only = (
        f" The demo's {' and '.join(shortened)} {'are' if len(shortened) > 1 else 'is'} "
        "shortened so that its quiet period shows the pool shrinking; leave "
        f"{'them' if len(shortened) > 1 else 'it'} at the default."
        if shortened
        else ""
    )
    return f"""<section id="adopt">
<h2>How to adopt this</h2>
<p>On your site, the switch from the user report's settings is these lines of
<code>settings.py</code> (the demo's site has <code>"connguard.django"</code> installed in
both runs). From Django's native pool, keep your <code>OPTIONS["pool"]</code> and change
the rest the same way.</p>
<pre class="diff">{diff}</pre>
<ul>
<li><b><code>ENGINE</code></b>: the pool. Every request's connections go back when it
ends, in whatever thread they were taken; at most processes &times; <code>max_size</code>
backends. <code>CONN_MAX_AGE</code> has no effect under it and
<code>CONN_HEALTH_CHECKS</code> is redundant: remove them.</li>
<li><b><code>"connguard.django"</code></b> in <code>INSTALLED_APPS</code>: system checks of
these settings (<code>manage.py check</code>) and <code>manage.py connguard status</code> /
<code>doctor</code>.</li>
<li><b><code>ConnguardMiddleware</code></b>, first in <code>MIDDLEWARE</code>: connections back
as soon as the response is ready, and overload as a fast 503 with
<code>Retry-After</code> instead of a 500.</li>
</ul>
<p class="note">Size <code>max_size</code> so that processes &times; <code>max_size</code>
fits in <code>max_connections</code> minus the reserved connections.{demo_only}</p>
<p>The full checklist, deployment (gunicorn, uvicorn, daphne, Celery, pgbouncer) and how to
check the result: <a href="{_e(DJANGO_DOCS_URL)}#install">docs/django.md</a>, section
&ldquo;Install&rdquo; (<code>docs/django.md</code> in the connguard source tree).</p>
</section>"""


def _command_line(result: DemoResult) -> str:
    """The demo's command line, rebuilt from its options: ``sys.argv`` may hold a
    ``--dsn`` with a password, which has no place in a file people share."""
    options, pg = result.options, result.postgres
    words = [
        "connguard demo",
        f"--requests {options['requests']}",
        f"--concurrency {options['concurrency']}",
        f"--server {options['server']}",
        f"--quiet-seconds {options['quiet_seconds']:g}",
    ]
    if options["dsn"]:
        words.append(f"--dsn <{pg['host']}:{pg['port']}>")
    else:
        words.append(f"--max-connections {pg['max_connections']}")
    if options["port"] is not None:
        words.append(f"--port {options['port']}")
    return " ".join(words)


def _interval(run: RunResult) -> str:
    times = [s["t"] for s in run.samples]
    if len(times) < 2:
        return "0.1"
    return f"{(times[-2] - times[0]) / max(1, len(times) - 2):.2f}"


def write_report(result: DemoResult, path: Path) -> Path:
    """Write the report to ``path`` (atomically: a reader never sees half a file)."""
    path = path.resolve()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_report(result), encoding="utf-8")
    tmp.replace(path)
    return path
