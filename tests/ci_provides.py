"""Skips of things the CI environment provides (docs/testing.md): on a
developer machine a missing one skips, saying why; under CI (``CI=true``,
as CI services set it) it fails, because there its absence is a broken
set-up, not a choice."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing(reason: str) -> NoReturn:
    """Skip the test for ``reason``, or fail it under CI."""
    if under_ci():
        pytest.fail(f"{reason}; CI provides it (stuart/bootstrap.sh), so under CI=true this fails instead of "
                    "skipping", pytrace=False)
    pytest.skip(reason)
