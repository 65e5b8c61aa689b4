"""Deterministic fuzz runs of the dispatcher built with ASan/UBSan and guard
pages (host_shim/devtools/fuzz.py; long runs: docs/testing.md)."""

from __future__ import annotations

import pytest

from host_shim.devtools import fuzz


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_dispatcher_breaks_no_invariant(seed: int) -> None:
    result = fuzz.run_driver(seed, 1500, timeout=300)
    assert result.returncode == 0, f"fuzz seed {seed} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert "no invariant broken" in result.stdout
