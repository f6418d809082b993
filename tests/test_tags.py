"""The application_name tag: within PostgreSQL's 63 bytes, parseable, safe."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connguard.diagnostics.tags import MAX_BYTES, make_tag, parse_tag


def test_round_trip() -> None:
    tag = make_tag("mysite", "default", host="web-1.example.com", pid=4711)
    assert tag == "mysite|cg|web-1|4711|default"
    parsed = parse_tag(tag)
    assert parsed is not None
    assert (parsed.prefix, parsed.host, parsed.pid, parsed.alias) == (
        "mysite", "web-1", 4711, "default"
    )  # fmt: skip


def test_defaults_are_this_host_and_process() -> None:
    parsed = parse_tag(make_tag("p", "replica"))
    assert parsed is not None and parsed.pid == os.getpid() and parsed.alias == "replica"


@pytest.mark.parametrize("name", [None, "", "psql", "pgbouncer", "mysite|cg|x|notapid|a"])
def test_untagged_names(name: str | None) -> None:
    assert parse_tag(name) is None


@given(
    prefix=st.text(max_size=120),
    alias=st.text(max_size=40),
    host=st.text(min_size=1, max_size=80),
    pid=st.integers(min_value=1, max_value=4_194_304),
)
def test_any_input_gives_a_short_ascii_parseable_tag(
    prefix: str, alias: str, host: str, pid: int
) -> None:
    tag = make_tag(prefix, alias, host=host, pid=pid)
    assert len(tag.encode()) <= MAX_BYTES
    assert tag.isascii()
    parsed = parse_tag(tag)
    assert parsed is not None and parsed.pid == pid
