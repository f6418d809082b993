"""Django's test runner, recording each test's outcome for ``.ci/django-suite``.

Outcomes go, as JSON, to the file named by ``CONNGUARD_SUITE_RESULTS``:
``{"django": VERSION, "outcomes": {test_id: outcome}, "details": {test_id: text},
"skip_reasons": {test_id: reason}}``
where outcome is pass, fail, error, skip, xfail (an expected failure) or xpass (an
unexpected success). A failing subtest counts against its test. With ``--parallel``
the workers' events are replayed on the parent's result object, so this works in
both modes. An error outside a test (a failed import, setUpClass) is recorded under
the id unittest gives it (``setUpClass (module.Class)``, ``unittest.loader._FailedTest.x``).
"""

# ruff: noqa: TID251  (a Django test runner: it imports Django)
from __future__ import annotations

import json
import os
import unittest
from typing import Any

import django
from django.test.runner import DiscoverRunner

_RANK = {"pass": 0, "skip": 0, "xfail": 0, "xpass": 1, "fail": 2, "error": 3}


class RecordingResult(unittest.TextTestResult):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, str] = {}
        self.details: dict[str, str] = {}
        self.skip_reasons: dict[str, str] = {}

    def _record(self, test: Any, outcome: str, err: Any = None) -> None:
        test_id = test.id()
        previous = self.outcomes.get(test_id)
        if previous is None or _RANK[outcome] >= _RANK[previous]:
            self.outcomes[test_id] = outcome
        if err is not None and outcome in ("fail", "error"):
            try:
                text = self._exc_info_to_string(err, test)
            except Exception:  # a traceback that did not survive the trip from a worker
                text = f"{err[0].__name__}: {err[1]}"
            self.details[test_id] = (self.details.get(test_id, "") + text)[-20_000:]

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._record(test, "pass")

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._record(test, "fail", err)

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._record(test, "error", err)

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._record(test, "skip")
        self.skip_reasons[test.id()] = str(reason)

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._record(test, "xfail")

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self._record(test, "xpass")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failure = issubclass(err[0], test.failureException)
            self._record(test, "fail" if failure else "error", err)


class RecordingRunner(DiscoverRunner):
    def get_resultclass(self) -> type[unittest.TextTestResult]:
        return RecordingResult

    def run_suite(self, suite: Any, **kwargs: Any) -> Any:
        result = super().run_suite(suite, **kwargs)
        path = os.environ.get("CONNGUARD_SUITE_RESULTS")
        if path:
            data = {
                "django": django.get_version(),
                "tests_run": result.testsRun,
                "outcomes": getattr(result, "outcomes", {}),
                "details": getattr(result, "details", {}),
                "skip_reasons": getattr(result, "skip_reasons", {}),
            }
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
        return result
