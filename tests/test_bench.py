"""The benchmarks' arithmetic against numbers worked out by hand, and the
pipeline benchmark end to end on a small guest. Nothing here is timed:
speed is never pass/fail; this keeps `ovmf-mh bench pipeline` from breaking
unnoticed and its ratios from drifting from what the report says they are."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from host_shim.devtools import bench
from host_shim.devtools.bench import bench_pipeline, format_pipeline_report
from host_shim.devtools.profile_reference import format_profile


def test_rate_is_bytes_per_second_in_megabytes() -> None:
    assert bench._mbps(3_000_000, 1.5) == 2.0
    assert bench._mbps(1024 * 1024, 0.5) == pytest.approx(2.097152)


def _run(export: float, import_: float, start: float = 1.0, fixed: float = 0.5) -> dict[str, float]:
    return {"export_mbps": export, "import_mbps": import_, "export_total_s": 9.0, "import_total_s": 9.0,
            "helper_start_s": start, "import_fixed_s": fixed}


def test_pipeline_ratios_and_best_rounds_match_hand_computed_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every timing replaced by a number chosen here; the expected results
    below are worked out by hand from those numbers (1 MiB guest = 1,048,576
    bytes; MB/s = bytes / s / 10^6), not with bench.py's formulas."""
    monkeypatch.chdir(tmp_path)
    seconds = iter([0.5, 2.0])  # the plain copy, then the raw AEAD pass

    def best(rounds: int, run: Callable[[], object]) -> float:
        run()  # the work itself happens (the copy's file must exist); its time is ours
        return next(seconds)

    monkeypatch.setattr(bench, "_best", best)
    alone = iter([3.0, 4.0])
    monkeypatch.setattr(bench, "_reference_alone", lambda src, key, work: next(alone))
    runs = {
        ("reference", 1): iter([_run(1.0, 0.8), _run(1.5, 0.6)]),
        ("reference", 3): iter([_run(2.0, 1.0), _run(2.5, 1.1)]),
        ("firmware", 1): iter([_run(10.0, 8.0), _run(12.0, 9.0)]),
        ("firmware", 3): iter([_run(30.0, 20.0, 1.5, 0.4), _run(24.0, 27.0, 1.2, 0.3)]),
    }

    def pipeline_run(kind: str, helpers: int, *_: Any) -> dict[str, float]:
        return next(runs[(kind, helpers)])

    monkeypatch.setattr(bench, "_pipeline_run", pipeline_run)
    results = bench_pipeline(guest_mib=1, helpers=3, firmware=tmp_path / "unused.fd", rounds=2)
    assert all(next(it, None) is None for it in runs.values()), "every round ran, no more"
    expected = {
        "plain_copy_mbps": 2.097152,  # 1,048,576 B / 0.5 s
        "raw_aead_mbps": 0.524288,  # 1,048,576 B / 2 s
        "reference_helper_alone_mbps": 4.0,  # best of 3 and 4
        "reference_export_mbps": 1.5,  # best of 1.0 and 1.5
        "reference_import_mbps": 0.8,  # best of 0.8 and 0.6
        "reference_3_export_mbps": 2.5,
        "ratio_reference_vs_raw_aead": 2.86102294921875,  # 1.5 / 0.524288 = 1,500,000 / 524,288
        "ratio_reference_helper_alone_vs_raw_aead": 7.62939453125,  # 4,000,000 / 524,288
        "ratio_reference_pipeline_vs_helper_alone": 0.375,  # 1.5 / 4
        "ratio_reference_3_vs_raw_aead": 4.76837158203125,  # 2,500,000 / 524,288
        "firmware_1_export_mbps": 12.0,
        "firmware_1_import_mbps": 9.0,
        "firmware_3_export_mbps": 30.0,
        "firmware_3_import_mbps": 27.0,
        "ratio_firmware_n_vs_1_export": 2.5,  # 30 / 12
        "ratio_firmware_n_vs_1_import": 3.0,  # 27 / 9
        "ratio_firmware_n_export_vs_plain_copy": 14.30511474609375,  # 30,000,000 / 2,097,152
        "firmware_helper_start_s": 1.2,  # times: the lowest counts
        "firmware_import_fixed_s": 0.3,
    }
    assert {key: results[key] for key in expected} == pytest.approx(expected)
    assert results["firmware_export_rounds_mbps"] == {"1": [10.0, 12.0], "3": [30.0, 24.0]}
    assert results["firmware_import_rounds_mbps"] == {"1": [8.0, 9.0], "3": [20.0, 27.0]}
    report = "\n".join(format_pipeline_report(results))
    assert "ratio 3 / 1 firmware helpers: export 2.50, import 3.00" in report
    assert "ratio reference pipeline / reference helper alone (the shim's overhead): 0.38" in report
    assert "export rounds: 1 helper(s) 10.0 12.0; 3 helper(s) 30.0 24.0" in report


@pytest.mark.qemu
def test_bench_pipeline_runs_end_to_end(firmware: Path, work_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work_dir)  # the benchmark's scratch files go to the current directory
    results = bench_pipeline(guest_mib=4, helpers=2, firmware=firmware, rounds=2, profile=True)
    rates = [key for key in results if key.endswith("_mbps") and not key.endswith("rounds_mbps")]
    assert {"raw_aead_mbps", "reference_helper_alone_mbps", "reference_export_mbps", "reference_import_mbps",
            "firmware_1_export_mbps", "firmware_2_import_mbps", "plain_copy_mbps"} <= set(rates)
    assert all(math.isfinite(results[key]) and results[key] > 0 for key in rates)
    for kind in ("export", "import"):
        rounds = results[f"firmware_{kind}_rounds_mbps"]
        assert sorted(rounds) == ["1", "2"] and all(len(values) == 2 for values in rounds.values())
        assert results[f"firmware_2_{kind}_mbps"] == max(rounds["2"]), "the best round counts"
    profile = results["reference_profile_us_per_page"]
    assert len(profile) == 8 and all(value > 0 for value in profile.values())
    report = "\n".join(format_pipeline_report(results) + format_profile(profile))
    assert "ratio 2 / 1 firmware helpers" in report and "whole write_records, untracked" in report
    assert not list(work_dir.glob("ovmf-mh-bench-pipeline-*")), "scratch files left behind"
