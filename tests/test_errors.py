"""connguard's errors travel: ``pickle`` (Django's parallel test runner,
``multiprocessing``, Celery result backends) keeps their class, specialized ones
included, message, ``pool`` and ``counts``; Django still wraps them as its own
``OperationalError``; ``detach`` cuts their frames loose.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import psycopg2
import pytest

from connguard.pool import Pool, PoolConfig
from connguard.pool.errors import (
    _BASES,
    ConnectFailed,
    PoolCounts,
    PoolError,
    PoolTimeout,
    detach,
    specialize,
)

from .fakes import FakeDriver, FakeOperationalError

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = range(2, pickle.HIGHEST_PROTOCOL + 1)
ALL_CLASSES = (PoolError, *_BASES)
DRIVER_ERRORS = {"psycopg": psycopg.OperationalError, "psycopg2": psycopg2.OperationalError}
COUNTS = PoolCounts(size=4, in_use=4, idle=0, waiting=2, opening=1)


def make(cls: type[PoolError]) -> PoolError:
    err = cls(
        "connguard pool 'default': no connection within 1.00 s", pool="default", counts=COUNTS
    )
    err.add_note("a note added on the way")
    return err


def assert_same(copied: BaseException, original: PoolError) -> None:
    assert type(copied) is type(original)
    assert isinstance(copied, PoolError)
    assert copied.args == original.args and str(copied) == str(original)
    assert copied.pool == original.pool and copied.counts == original.counts
    assert copied.__notes__ == original.__notes__


# -- pickle ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_plain_errors_round_trip(cls: type[PoolError], protocol: int) -> None:
    err = make(cls)
    assert_same(pickle.loads(pickle.dumps(err, protocol)), err)
    assert pickle.loads(pickle.dumps(cls, protocol)) is cls
    bare = cls("no counts", pool="p")
    copied = pickle.loads(pickle.dumps(bare, protocol))
    assert (copied.pool, copied.counts, str(copied)) == ("p", None, "no counts")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("base", _BASES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("driver", DRIVER_ERRORS)
def test_specialized_errors_round_trip_as_the_drivers_error(
    driver: str, base: type[PoolError], protocol: int
) -> None:
    operational_error = DRIVER_ERRORS[driver]
    cls = specialize(base, operational_error)
    err = make(cls)
    copied = pickle.loads(pickle.dumps(err, protocol))
    assert_same(copied, err)
    assert type(copied) is specialize(base, operational_error)
    assert isinstance(copied, operational_error) and isinstance(copied, base)
    if issubclass(base, ConnectFailed):
        assert isinstance(copied, specialize(PoolTimeout, operational_error))
    # the class alone (unittest's exc_info carries it next to the instance)
    assert pickle.loads(pickle.dumps(cls, protocol)) is cls
    assert copy.copy(err).counts == COUNTS and type(copy.deepcopy(err)) is cls


def test_driver_fields_survive_next_to_ours() -> None:
    """psycopg2's C-level fields and psycopg's own attributes are still there."""
    p2 = pickle.loads(pickle.dumps(make(specialize(ConnectFailed, psycopg2.OperationalError))))
    assert (p2.pgcode, p2.pgerror, p2.cursor) == (None, None, None)
    p3 = pickle.loads(pickle.dumps(make(specialize(ConnectFailed, psycopg.OperationalError))))
    assert p3.pgconn is None and p3.sqlstate is None and p3.diag.sqlstate is None


class MyTimeout(PoolTimeout):
    """A user's own error class: pickled by reference, as usual."""


SpecializedSubclass = type(
    "SpecializedSubclass", (specialize(PoolTimeout, psycopg.OperationalError),), {}
)


@pytest.mark.parametrize("cls", [MyTimeout, SpecializedSubclass], ids=lambda c: c.__name__)
def test_subclasses_pickle_by_reference(cls: type[PoolError]) -> None:
    err = make(cls)
    assert_same(pickle.loads(pickle.dumps(err)), err)
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_errors_a_pool_raises_round_trip() -> None:
    pool = Pool(FakeDriver(), PoolConfig(min_size=0, max_size=1, timeout=0.05), name="fake")
    try:
        with pool.acquire(), pytest.raises(PoolTimeout) as info:
            pool.acquire()
    finally:
        pool.close()
    err = info.value
    copied = pickle.loads(pickle.dumps(err))
    assert type(copied) is type(err) and isinstance(copied, FakeOperationalError)
    assert copied.pool == "fake" and copied.counts == err.counts and str(copied) == str(err)


def test_round_trip_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """Where no specialized class exists yet: unpickling builds it (ConnectFailed before
    its specialized parent PoolTimeout, the order that needs the parent built first)."""
    errors = [make(specialize(base, op)) for op in DRIVER_ERRORS.values() for base in _BASES]
    errors = [*sorted(errors, key=lambda e: not isinstance(e, ConnectFailed)), make(PoolError)]
    path = tmp_path / "errors.pickle"
    path.write_bytes(pickle.dumps(errors))
    script = textwrap.dedent(
        f"""
        import json, pickle, sys
        import psycopg, psycopg2
        from connguard.pool.errors import ConnectFailed, PoolTimeout, specialize
        out = []
        for err in pickle.loads(open({str(path)!r}, "rb").read()):
            op = [c for c in (psycopg.OperationalError, psycopg2.OperationalError)
                  if isinstance(err, c)]
            out.append({{
                "type": type(err).__name__,
                "driver": op[0].__module__ if op else None,
                "is_specialize": bool(op) and type(err) is specialize(
                    type(err).__mro__[1], op[0]),
                "caught_as_timeout": bool(op) and isinstance(err, ConnectFailed)
                    and isinstance(err, specialize(PoolTimeout, op[0])),
                "pool": err.pool, "counts": str(err.counts), "message": str(err),
            }})
        json.dump(out, sys.stdout)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert [s["type"] for s in seen] == [type(e).__name__ for e in errors]
    for s, err in zip(seen, errors, strict=True):
        specialized = type(err) is not PoolError
        assert s["driver"] == (type(err).__mro__[-4].__module__ if specialized else None)
        assert s["is_specialize"] is specialized
        assert s["caught_as_timeout"] is isinstance(err, ConnectFailed)
        assert (s["pool"], s["counts"], s["message"]) == ("default", str(COUNTS), str(err))


@pytest.mark.parametrize("driver", DRIVER_ERRORS)
def test_unpickled_errors_are_wrapped_as_djangos_operational_error(driver: str) -> None:
    """Django's error wrapper picks its class from the driver's hierarchy: the copy
    must still be the driver's OperationalError for ``except OperationalError``."""
    from types import SimpleNamespace

    from django.db.utils import DatabaseErrorWrapper, OperationalError

    module = psycopg if driver == "psycopg" else psycopg2
    wrapper = SimpleNamespace(Database=module, errors_occurred=False)
    for base in _BASES:
        copied = pickle.loads(pickle.dumps(make(specialize(base, DRIVER_ERRORS[driver]))))
        with pytest.raises(OperationalError) as info, DatabaseErrorWrapper(wrapper):
            raise copied
        assert info.value.__cause__ is copied and str(info.value) == str(copied)
        assert wrapper.errors_occurred


# -- detach ---------------------------------------------------------------------------


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as if it came from deep inside a driver."""

    def deep(conninfo: str) -> None:
        raise exc

    try:
        deep("password=hunter2")
    except BaseException as caught:
        return caught
    raise AssertionError("unreachable")


def chained() -> BaseException:
    root = raised(psycopg.OperationalError("connection refused"))
    context = raised(ValueError("while handling"))
    context.__context__ = root
    top = raised(specialize(ConnectFailed, psycopg.OperationalError)("unreachable", pool="p"))
    top.__cause__ = context
    return top


def walk(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def test_detach_drops_every_traceback_in_the_chain() -> None:
    top = chained()
    chain = walk(top)
    assert len(chain) == 3 and all(e.__traceback__ is not None for e in chain)
    assert detach(top) is top
    assert [e.__traceback__ for e in chain] == [None, None, None]
    assert walk(top) == chain  # the chain, messages and types stay
    assert str(chain[-1]) == "connection refused"


def test_detach_survives_cycles_and_groups() -> None:
    a, b = raised(ValueError("a")), raised(KeyError("b"))
    a.__context__, b.__context__ = b, a
    member = raised(OSError("member"))
    group = raised(ExceptionGroup("group", [member, a]))
    detach(group)
    assert group.__traceback__ is None and member.__traceback__ is None
    assert a.__traceback__ is None and b.__traceback__ is None


def test_detach_is_bounded() -> None:
    """A pathological chain is cut at 64, without recursion."""
    chain = [raised(ValueError(str(i))) for i in range(200)]
    for outer, inner in itertools.pairwise(chain):
        outer.__cause__ = inner
    detach(chain[0])
    assert all(e.__traceback__ is None for e in chain[:64])
    assert all(e.__traceback__ is not None for e in chain[64:])


# -- Django's parallel test runner --------------------------------------------------------

SETTINGS = """
import json, os, sys

if os.environ["CGPROJ_DRIVER"] == "psycopg2":
    sys.modules["psycopg"] = None  # Django (and connguard) fall back to psycopg2

SECRET_KEY = "cgproj-not-secret-" + "x" * 40
INSTALLED_APPS = ["connguard.django"]
USE_TZ = True
DATABASES = {
    "default": {
        "ENGINE": "connguard.backends.postgresql",
        **json.loads(os.environ["CGPROJ_DB"]),
        "OPTIONS": {"pool": {"max_size": 2, "timeout": 1.0, "reconnect_backoff": 0.1}},
    }
}
"""

TESTS = """
import os

from django.db import connections
from django.test import SimpleTestCase

from connguard.drivers import load_driver
from connguard.pool import Pool, PoolConfig


class ThroughTheORM(SimpleTestCase):
    def test_database_unreachable(self):
        settings = {**connections["default"].settings_dict}
        settings["PORT"] = int(os.environ["CGPROJ_DEAD_PORT"])
        wrapper = type(connections["default"])(settings, alias="unreachable")
        try:
            wrapper.ensure_connection()  # Django's OperationalError from ConnectFailed
        finally:
            wrapper.close()

    def test_passes(self):
        pass


class FromThePool(SimpleTestCase):
    def test_pool_timeout(self):
        driver = load_driver(os.environ["CGPROJ_DRIVER"], conninfo=os.environ["CGPROJ_DSN"])
        pool = Pool(driver, PoolConfig(min_size=0, max_size=1, timeout=0.3), name="tiny")
        try:
            with pool.acquire():
                pool.acquire()  # PoolTimeout, the driver's OperationalError, unwrapped
        finally:
            pool.close()

    def test_plain_failure(self):
        self.assertEqual(1, 2)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.real
@pytest.mark.parametrize("driver", DRIVER_ERRORS)
def test_django_parallel_runner_reports_pool_errors(pg: Any, tmp_path: Path, driver: str) -> None:
    """``manage.py test --parallel 2`` with tests failing on pool errors: the run reports
    each failing test with its chained traceback instead of crashing on a pickle error.

    Django needs tblib to send any traceback from a worker (without it every failing
    test, ours or not, crashes the run: "cannot pickle 'traceback' object"); with it,
    dynamically built exception classes were what still broke it."""
    pytest.importorskip("tblib", reason="Django's parallel runner needs tblib for tracebacks")
    from psycopg.conninfo import conninfo_to_dict

    project = tmp_path / "cgproj"
    project.mkdir()
    (project / "__init__.py").write_text("")
    (project / "settings.py").write_text(SETTINGS)
    (project / "tests.py").write_text(TESTS)
    params = conninfo_to_dict(pg.dsn)
    db = {
        "HOST": params.get("host", "127.0.0.1"),
        "PORT": params.get("port", "5432"),
        "NAME": params.get("dbname", "postgres"),
        "USER": params.get("user", "postgres"),
        "PASSWORD": params.get("password", ""),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DJANGO"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT / "src")]),
        CGPROJ_DRIVER=driver,
        CGPROJ_DB=json.dumps(db),
        CGPROJ_DSN=pg.dsn,
        CGPROJ_DEAD_PORT=str(free_port()),
    )
    result = subprocess.run(
        [sys.executable, "-m", "django", "test", "cgproj.tests", "--parallel", "2",
         "--settings=cgproj.settings", "-v", "2", "--noinput"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    for crash in ("PicklingError", "cannot pickle", "Unfortunately", "MaybeEncodingError"):
        assert crash not in output, output[-6000:]
    assert result.returncode == 1, output[-6000:]
    assert "Ran 4 tests" in output and "FAILED (failures=1, errors=2)" in output, output[-6000:]
    for line in (
        "ERROR: test_database_unreachable (cgproj.tests.ThroughTheORM",
        "ERROR: test_pool_timeout (cgproj.tests.FromThePool",
        "FAIL: test_plain_failure (cgproj.tests.FromThePool",
    ):
        assert line in output, output[-6000:]
    # The chain came across: Django's error, the pool's, the driver's.
    assert "django.db.utils.OperationalError: connguard pool 'unreachable'" in output
    assert "connguard.pool.errors.ConnectFailed: connguard pool 'unreachable'" in output
    assert "The above exception was the direct cause of the following exception" in output
    assert "connguard.pool.errors.PoolTimeout: connguard pool 'tiny'" in output


def test_chain_walks_causes_then_contexts_and_stops_at_a_cycle() -> None:
    from connguard.pool.errors import chain

    inner, middle, outer = ValueError("inner"), KeyError("middle"), RuntimeError("outer")
    outer.__cause__ = middle
    middle.__context__ = inner
    inner.__context__ = outer  # a cycle
    assert list(chain(outer)) == [outer, middle, inner]
    assert list(chain(outer, limit=2)) == [outer, middle]
    assert list(chain(None)) == []
