"""A django-debug-toolbar panel: the connections one request leased.

.. code-block:: python

    DEBUG_TOOLBAR_PANELS = [
        # ... the default panels ...
        "connguard.django.debug_toolbar.ConnguardPanel",
    ]

For each lease the request took (whichever thread took it for the request): the
alias, how long the request waited for it, how long it held it, what giving it back
took (nothing, a rollback, a full reset, a cancel, or closing a broken connection),
whether a server-side cursor was open on it, and the ``file:line`` that acquired it.

It watches the request's scope (:class:`connguard.scope.Scope`): while the panel is
enabled, the scope keeps a journal of its leases; without the panel nothing is
recorded. Importing this module needs ``django-debug-toolbar``.
"""

from __future__ import annotations

from typing import Any

from debug_toolbar.panels import Panel
from django.utils.html import format_html, format_html_join

from connguard.scope import Scope, current_scope

_CLEANUP = {
    None: "given back as it was",
    "rollback": "rolled back",
    "reset": "reset (session state changed)",
    "cancel": "statement cancelled, closed",
    "broken": "broken, closed",
}


class ConnguardPanel(Panel):
    title = "connguard"
    is_async = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._scope: Scope | None = None

    def enable_instrumentation(self) -> None:
        scope = current_scope()
        if scope is not None and scope.kind == "request":
            scope.journal = []
            self._scope = scope

    def disable_instrumentation(self) -> None:
        if self._scope is not None:
            self._scope.journal = None

    def generate_stats(self, request: Any, response: Any) -> None:
        scope = self._scope
        records = list(scope.journal or []) if scope is not None else []
        leases = []
        for record in records:
            lease = record["lease"]
            ended = lease.released_at
            held = None if ended is None else max(0.0, ended - lease.acquired_at)
            leases.append({
                "alias": record["alias"],
                "waited_ms": round(record["waited"] * 1000, 3),
                "held_ms": None if held is None else round(held * 1000, 3),
                "still_held": ended is None,
                "cleanup": _CLEANUP.get(lease.cleanup, f"closed ({lease.cleanup})"),
                "server_side_cursor": lease.server_cursors is not None,
                "where": lease.where()[:3],
            })  # fmt: skip
        self.record_stats({"leases": leases})

    @property
    def nav_subtitle(self) -> str:
        leases = self.get_stats().get("leases", [])
        held = sum(lease["held_ms"] or 0 for lease in leases)
        return f"{len(leases)} lease(s), held {held:.1f} ms"

    @property
    def content(self) -> str:
        leases = self.get_stats().get("leases", [])
        if not leases:
            return format_html("<p>{}</p>", "This request leased no connection.")
        rows = format_html_join(
            "\n",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    lease["alias"],
                    f"{lease['waited_ms']:.3f} ms",
                    "still held" if lease["still_held"] else f"{lease['held_ms']:.3f} ms",
                    lease["cleanup"],
                    "yes" if lease["server_side_cursor"] else "no",
                    format_html_join(
                        "", "<div><code>{}</code></div>", ((w,) for w in lease["where"])
                    ),
                )
                for lease in leases
            ),
        )
        return format_html(
            "<table><thead><tr><th>alias</th><th>waited</th><th>held</th>"
            "<th>given back</th><th>server-side cursor</th><th>acquired at</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )
