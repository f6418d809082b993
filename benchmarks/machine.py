"""What machine and software a benchmark ran on, for the figures' provenance.

Shared by ``bench_pool.py`` and ``bench_django.py``: both record the same
description so their figures can be compared and reproduced.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def dist_version(dist: str) -> str:
    """The installed version of distribution ``dist``, or "-" when it is missing."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def git_commit(where: Path = HERE) -> str:
    """``git describe`` of the tree being measured, the one holding ``where`` ("?"
    outside a checkout)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    return "?"


def machine() -> dict[str, Any]:
    """Python, platform, CPU model and usable cores."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0,
    }
