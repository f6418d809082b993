"""System checks for the ``CONNGUARD`` setting (E006-E008) and for connguard-only pool
keys under another ENGINE (W004), and the typed ``CONNGUARD`` accessor.

No database: the message builders are tested in-process (they need no Django
settings), and everything that needs configured settings runs in a subprocess, so
this module never configures Django in the test process (test_django_backend.py
does, once, for its real database). The ``OPTIONS["pool"]`` checks (E001-E005,
W001-W003, I001) are tested in test_django_backend.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from connguard.django import conf
from connguard.django.checks import (
    PSYCOPG_POOL_PARAMETERS,
    check_interpreter,
    connguard_setting_messages,
    interpreter_messages,
    misplaced_pool_key_messages,
)
from connguard.pool import PoolConfig

STOCK = "django.db.backends.postgresql"


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


def text(messages: list[Any]) -> str:
    return "\n".join(f"{m.id}: {m.msg} HINT: {m.hint}" for m in messages)


# -- the description of CONNGUARD ---------------------------------------------------


def test_every_key_is_described_once_with_its_default() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(conf.AppSettings)}
    assert fields == {name: spec.default for name, spec in conf.SETTINGS.items()}
    assert set(fields) == {
        "retry_after", "outage_retry_after", "application_name", "status_dir", "status_token",
        "opentelemetry",
    }  # fmt: skip
    assert conf.AppSettings(1, 5, None, None, None, False) == conf.DEFAULTS
    for spec in conf.SETTINGS.values():
        assert spec.valid(spec.default), spec.name
        assert spec.allowed and spec.meaning and spec.type


# -- E006, E007, E008: the CONNGUARD setting -----------------------------------------


@pytest.mark.parametrize(
    "good",
    [
        {},
        {"retry_after": 0, "outage_retry_after": 0},
        {"retry_after": 30, "outage_retry_after": 120, "application_name": "shop"},
        {"application_name": None},
        {"application_name": ""},
        {"application_name": "x" * 63},
        {"application_name": "é" * 31},  # 62 bytes
        {"status_dir": "/run/shop/connguard", "status_token": "0123456789abcdef"},
        {"status_dir": None, "status_token": None},
    ],
)
def test_good_connguard_settings_pass(good: dict[str, Any]) -> None:
    assert connguard_setting_messages(good) == []
    assert conf.validate(good) == []


@pytest.mark.parametrize("raw", ["abc", ["retry_after", 1], None, 2, ("retry_after",)])
def test_connguard_not_a_dict_is_e006(raw: object) -> None:
    messages = connguard_setting_messages(raw)
    assert ids(messages) == ["connguard.E006"]
    (message,) = messages
    assert "settings.CONNGUARD must be a dict" in message.msg and repr(raw) in message.msg
    assert "retry_after" in message.hint and "application_name" in message.hint


def test_unknown_connguard_key_is_e007_with_did_you_mean() -> None:
    messages = connguard_setting_messages({"retry_afer": 2, "retry_after": 3})
    assert ids(messages) == ["connguard.E007"], text(messages)
    (message,) = messages
    assert "'retry_afer'" in message.msg
    assert (
        "allowed keys: application_name, opentelemetry, outage_retry_after, retry_after, "
        "status_dir, status_token" in message.msg
    )
    assert message.hint == "Did you mean 'retry_after'?"
    assert connguard_setting_messages({"outage_retry": 1})[0].hint == (
        "Did you mean 'outage_retry_after'?"
    )


def test_unknown_connguard_key_without_a_close_match() -> None:
    (pool_key,) = connguard_setting_messages({"max_size": 5})
    assert pool_key.id == "connguard.E007"
    assert "DATABASES[alias]['OPTIONS']['pool']" in pool_key.hint, pool_key.hint
    (nothing_close,) = connguard_setting_messages({"zzz": 1})
    assert nothing_close.id == "connguard.E007" and "Did you mean" not in nothing_close.hint
    (not_a_string,) = connguard_setting_messages({1: 2})
    assert not_a_string.id == "connguard.E007" and "unknown key 1;" in not_a_string.msg


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("retry_after", "abc", "an integer number of seconds >= 0"),
        ("retry_after", "3", "an integer number of seconds >= 0"),
        ("retry_after", -1, "an integer number of seconds >= 0"),
        ("retry_after", 1.5, "an integer number of seconds >= 0"),
        ("retry_after", True, "an integer number of seconds >= 0"),
        ("retry_after", None, "an integer number of seconds >= 0"),
        ("outage_retry_after", -5, "an integer number of seconds >= 0"),
        ("outage_retry_after", "5", "an integer number of seconds >= 0"),
        ("application_name", 123, "at most 63 bytes (UTF-8) with no NUL character, or None"),
        ("application_name", "a\x00b", "no NUL character"),
        ("application_name", "x" * 64, "at most 63 bytes"),
        ("application_name", "é" * 32, "at most 63 bytes"),  # 32 characters, 64 bytes
        ("status_dir", "", "a directory path (a non-empty string), or None"),
        ("status_dir", 5, "a directory path"),
        ("opentelemetry", 1, "True or False"),
        ("opentelemetry", "yes", "True or False"),
    ],
)
def test_bad_connguard_value_is_e008(key: str, value: object, allowed: str) -> None:
    messages = connguard_setting_messages({key: value})
    assert ids(messages) == ["connguard.E008"], text(messages)
    (message,) = messages
    assert message.msg.startswith(f"settings.CONNGUARD[{key!r}] must be "), message.msg
    assert allowed in message.msg and f"(got {value!r})" in message.msg
    assert f"Default: {conf.SETTINGS[key].default!r}" in message.hint


@pytest.mark.parametrize("value", ["short-secret", "x" * 15, b"0123456789abcdef0", 12345])
def test_a_bad_status_token_is_e008_and_never_quoted(value: object) -> None:
    (message,) = connguard_setting_messages({"status_token": value})
    assert message.id == "connguard.E008"
    assert "at least 16 printable characters" in message.msg
    assert repr(value) not in message.msg + message.hint and str(value) not in message.msg
    assert f"(got a {type(value).__name__}" in message.msg


def test_every_problem_is_reported_in_key_order() -> None:
    messages = connguard_setting_messages(
        {"retry_after": "abc", "outage_retry_after": -1, "aplication_name": "x"}
    )
    assert ids(messages) == ["connguard.E007", "connguard.E008", "connguard.E008"]
    assert [m.msg.split(";")[0].split(" must ")[0] for m in messages] == [
        "settings.CONNGUARD has an unknown key 'aplication_name'",
        "settings.CONNGUARD['outage_retry_after']",
        "settings.CONNGUARD['retry_after']",
    ]


# -- the accessor -------------------------------------------------------------------


class BrokenMapping(Mapping[str, Any]):
    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("broken")

    def __iter__(self) -> Iterator[str]:
        return iter(["retry_after"])

    def __len__(self) -> int:
        return 1


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "abc",
        [1, 2],
        {"retry_after": "abc", "outage_retry_after": -1, "application_name": 5},
        {"retry_after": True, "application_name": "a\x00"},
        {"bogus": 1, 2: 3},
        BrokenMapping(),
    ],
)
def test_the_accessor_never_raises_and_falls_back_to_defaults(raw: object) -> None:
    assert conf.read_app_settings(raw) == conf.DEFAULTS


def test_the_accessor_keeps_good_values_beside_bad_ones() -> None:
    read = conf.read_app_settings(
        {"retry_after": "abc", "outage_retry_after": 9, "application_name": "shop", "x": 1}
    )
    assert read == conf.AppSettings(retry_after=1, outage_retry_after=9, application_name="shop")
    assert conf.read_app_settings({"retry_after": 0}).retry_after == 0


def test_the_accessor_agrees_with_the_check() -> None:
    """A value the check accepts is used; one it reports is replaced by its default."""
    for name, spec in conf.SETTINGS.items():
        for value in (0, 7, -1, "7", "shop", None, True, 2.5, "x" * 64):
            used = getattr(conf.read_app_settings({name: value}), name)
            reported = bool(conf.validate({name: value}))
            assert used == (spec.default if reported else value), (name, value)


# -- W004: connguard-only pool keys under another ENGINE ------------------------------


def databases(engine: str, pool: Any) -> dict[str, Any]:
    return {"default": {"ENGINE": engine, "NAME": "app", "OPTIONS": {"pool": pool}}}


def test_connguard_only_pool_keys_under_the_stock_engine_is_w004() -> None:
    pool = {"min_size": 1, "max_size": 4, "ping_after_idle": 5.0, "reclaim": True}
    messages = misplaced_pool_key_messages(databases(STOCK, pool))
    assert ids(messages) == ["connguard.W004"]
    (message,) = messages
    assert "DATABASES['default']['OPTIONS']['pool']" in message.msg
    assert "'ping_after_idle'" in message.msg and "'reclaim'" in message.msg
    assert "'min_size'" not in message.msg and "'max_size'" not in message.msg
    assert f"ENGINE is {STOCK!r}" in message.msg and "TypeError" in message.msg
    assert "Set ENGINE to 'connguard.backends.postgresql'" in message.hint
    assert "remove 'ping_after_idle', 'reclaim'" in message.hint


@pytest.mark.parametrize(
    ("pool", "named"),
    [
        ({"reset": "always"}, "'always' is a connguard reset policy"),
        ({"max_lifetime": None}, "'max_lifetime' (None (never) is connguard's"),
        ({"max_idle": None, "timeout": 2}, "'max_idle' (None (never) is connguard's"),
        ({"background_reset": False}, "'background_reset' (a connguard setting)"),
    ],
)
def test_connguard_only_pool_values_under_the_stock_engine_are_w004(
    pool: dict[str, Any], named: str
) -> None:
    messages = misplaced_pool_key_messages(databases(STOCK, pool))
    assert ids(messages) == ["connguard.W004"] and named in messages[0].msg, text(messages)


@pytest.mark.parametrize(
    ("engine", "pool"),
    [
        (STOCK, {"min_size": 2, "max_size": 4, "timeout": 5, "max_waiting": 0}),
        (STOCK, {"max_lifetime": 600.0, "max_idle": 60.0, "num_workers": 2}),
        (STOCK, {"reset": print, "check": print}),  # psycopg_pool's own callables
        (STOCK, {"reset": None}),
        (STOCK, True),
        (STOCK, None),
        ("connguard.backends.postgresql", {"ping_after_idle": 5.0, "reset": "always"}),
    ],
)
def test_no_w004_for_psycopg_pool_keys_or_connguards_engine(engine: str, pool: Any) -> None:
    assert misplaced_pool_key_messages(databases(engine, pool)) == []


def test_no_w004_without_a_pool() -> None:
    assert misplaced_pool_key_messages({}) == []
    assert misplaced_pool_key_messages({"default": {"ENGINE": STOCK}}) == []
    assert misplaced_pool_key_messages({"default": {"ENGINE": STOCK, "OPTIONS": {}}}) == []


def test_psycopg_pool_parameters_match_the_installed_psycopg_pool() -> None:
    """The static list decides what is connguard-only; the installed psycopg_pool
    must agree about every pool setting connguard has."""
    psycopg_pool = pytest.importorskip("psycopg_pool")
    for pool_class in (psycopg_pool.ConnectionPool, psycopg_pool.NullConnectionPool):
        accepted = set(inspect.signature(pool_class.__init__).parameters) - {"self"}
        for key in PoolConfig.settings():
            assert (key in accepted) == (key in PSYCOPG_POOL_PARAMETERS), key


# -- through Django: manage.py check and the cached accessor, in subprocesses ----------

SETTINGS_HEAD = """
import psycopg

def _connect(*args, **kwargs):  # a system check must never connect
    open({marker!r}, "w").close()
    raise AssertionError("a system check connected to the database")

psycopg.connect = _connect
SECRET_KEY = "test"
INSTALLED_APPS = ["connguard.django"]
MIDDLEWARE = ["connguard.django.middleware.ConnguardMiddleware"]
USE_TZ = True
DATABASES = {{
    "default": {{
        "ENGINE": "connguard.backends.postgresql",
        "NAME": "app", "HOST": "127.0.0.1", "PORT": "1",
        "OPTIONS": {{"pool": {{"max_size": 4}}}},
    }},
}}
"""


def run_python(tmp_path: Path, body: str, *args: str) -> subprocess.CompletedProcess[str]:
    marker = tmp_path / "connected"
    settings = SETTINGS_HEAD.format(marker=str(marker)) + textwrap.dedent(body)
    (tmp_path / "cg_check_settings.py").write_text(settings)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "DJANGO_SETTINGS_MODULE": "cg_check_settings",
    }
    result = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert not marker.exists(), "the check connected to the database"
    return result


def manage_check(tmp_path: Path, body: str, *args: str) -> tuple[int, str]:
    result = run_python(tmp_path, body, "-m", "django", "check", *args)
    return result.returncode, result.stdout + result.stderr


def test_manage_py_check_reports_bad_connguard_settings(tmp_path: Path) -> None:
    code, output = manage_check(
        tmp_path,
        """
        CONNGUARD = {"retry_after": "abc", "retry_afer": 2, "outage_retry_after": -1}
        DATABASES["stock"] = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "app",
            "OPTIONS": {"pool": {"max_size": 4, "ping_after_idle": 5.0}},
        }
        """,
    )
    assert code == 1, output
    assert "connguard.E008" in output and "connguard.E007" in output, output
    assert "settings.CONNGUARD['retry_after'] must be an integer number of seconds >= 0" in output
    assert "(got 'abc')" in output and "Did you mean 'retry_after'?" in output
    assert "settings.CONNGUARD['outage_retry_after']" in output
    assert "connguard.W004" in output and "'ping_after_idle'" in output
    assert "connguard.E006" not in output and "connguard.W002" not in output


def test_manage_py_check_reports_connguard_not_a_dict(tmp_path: Path) -> None:
    code, output = manage_check(tmp_path, 'CONNGUARD = "retry_after=2"\n')
    assert code == 1, output
    assert "connguard.E006" in output and "settings.CONNGUARD must be a dict" in output
    assert "connguard.E007" not in output and "connguard.E008" not in output


@pytest.mark.parametrize(
    "body",
    [
        "",  # no CONNGUARD at all
        "CONNGUARD = {}\n",
        'CONNGUARD = {"retry_after": 2, "outage_retry_after": 10, "application_name": "shop"}\n',
    ],
)
def test_manage_py_check_passes_good_settings(tmp_path: Path, body: str) -> None:
    code, output = manage_check(tmp_path, body)
    assert code == 0, output
    assert "connguard." not in output, output
    assert "no issues" in output, output


def test_manage_py_check_w004_alone_is_a_warning(tmp_path: Path) -> None:
    body = """
    DATABASES["default"]["ENGINE"] = "django.db.backends.postgresql"
    DATABASES["default"]["OPTIONS"]["pool"]["reclaim"] = True
    """
    code, output = manage_check(tmp_path, body)
    assert code == 0, output
    assert "connguard.W004" in output and "'reclaim'" in output, output
    code, output = manage_check(tmp_path, body, "--fail-level", "WARNING")
    assert code == 1 and "connguard.W004" in output, output


def test_app_settings_follows_settings_changes_and_never_raises(tmp_path: Path) -> None:
    script = """
    from django.conf import settings
    from django.core.signals import setting_changed
    from django.test import override_settings

    from connguard.django.conf import DEFAULTS, AppSettings, app_settings
    from connguard.django.pools import tag_prefix

    assert app_settings() == DEFAULTS
    assert tag_prefix({}) == "cg_check_settings"
    with override_settings(CONNGUARD={"retry_after": 4, "application_name": "shop"}):
        assert app_settings() == AppSettings(retry_after=4, application_name="shop")
        assert app_settings() is app_settings()
        assert tag_prefix({}) == "shop"
        assert tag_prefix({"application_name": "own"}) == "own"
    assert app_settings() == DEFAULTS
    with override_settings(CONNGUARD={"retry_after": "abc", "outage_retry_after": 9}):
        assert app_settings() == AppSettings(retry_after=1, outage_retry_after=9)
    with override_settings(CONNGUARD={}):
        unset = tag_prefix({})  # (under override_settings, SETTINGS_MODULE is None)
    with override_settings(CONNGUARD={"application_name": "a\\x00b"}):
        assert tag_prefix({}) == unset
    with override_settings(CONNGUARD="abc"):
        assert app_settings() == DEFAULTS
    settings.CONNGUARD = {"retry_after": 6}  # assigned (monkeypatch does this): no signal
    assert app_settings().retry_after == 6
    del settings.CONNGUARD
    assert app_settings() == DEFAULTS
    with override_settings(CONNGUARD={"retry_after": 2}):
        assert app_settings().retry_after == 2
        settings.CONNGUARD["retry_after"] = 3  # changed in place: the signal says so
        setting_changed.send(None, setting="CONNGUARD", value=settings.CONNGUARD, enter=True)
        assert app_settings().retry_after == 3
    print("accessor ok")
    """
    (tmp_path / "accessor.py").write_text(textwrap.dedent(script))
    result = run_python(tmp_path, "", "-c", "import django; django.setup(); import accessor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accessor ok" in result.stdout


def test_app_settings_before_django_is_configured(tmp_path: Path) -> None:
    result = run_python(
        tmp_path,
        "",
        "-c",
        "import os; os.environ.pop('DJANGO_SETTINGS_MODULE');"
        "from connguard.django.conf import DEFAULTS, app_settings;"
        "assert app_settings() == DEFAULTS; print('defaults ok')",
    )
    assert result.returncode == 0 and "defaults ok" in result.stdout, result.stderr


def test_an_interpreter_without_the_gil_is_e009(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fence's uses count on the GIL: a free-threaded interpreter running without
    it is refused by ``manage.py check``, with how to turn the GIL on."""
    assert interpreter_messages(True) == []
    (message,) = interpreter_messages(False)
    assert message.id == "connguard.E009" and "PYTHON_GIL=1" in (message.hint or "")
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    assert ids(check_interpreter()) == ["connguard.E009"]
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: True, raising=False)
    assert check_interpreter() == []
