"""The pipeline benchmark runs end to end on a small guest and reports
consistent numbers. Nothing here is timed: speed is never pass/fail; this
only keeps `ovmf-mh bench pipeline` from breaking unnoticed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from host_shim.bench import bench_pipeline, format_pipeline_report
from host_shim.profile_reference import format_profile


@pytest.mark.qemu
def test_bench_pipeline_reports_consistent_ratios(
    firmware: Path, work_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(work_dir)  # the benchmark's scratch files go to the current directory
    results = bench_pipeline(guest_mib=8, helpers=2, firmware=firmware, rounds=1, profile=True)
    rates = [key for key in results if key.endswith("_mbps") and not key.endswith("rounds_mbps")]
    assert {"raw_aead_mbps", "reference_helper_alone_mbps", "reference_export_mbps", "reference_import_mbps",
            "firmware_1_export_mbps", "firmware_2_import_mbps", "plain_copy_mbps"} <= set(rates)
    assert all(math.isfinite(results[key]) and results[key] > 0 for key in rates)
    assert results["ratio_reference_vs_raw_aead"] == pytest.approx(
        results["reference_export_mbps"] / results["raw_aead_mbps"])
    assert results["ratio_reference_pipeline_vs_helper_alone"] == pytest.approx(
        results["reference_export_mbps"] / results["reference_helper_alone_mbps"])
    assert results["ratio_firmware_n_vs_1_import"] == pytest.approx(
        results["firmware_2_import_mbps"] / results["firmware_1_import_mbps"])
    assert results["firmware_export_rounds_mbps"]["2"] == [results["firmware_2_export_mbps"]]
    profile = results["reference_profile_us_per_page"]
    assert len(profile) == 8 and all(value > 0 for value in profile.values())
    report = "\n".join(format_pipeline_report(results) + format_profile(profile))
    assert "ratio 2 / 1 firmware helpers" in report and "whole write_records, untracked" in report
    assert not list(work_dir.glob("ovmf-mh-bench-pipeline-*")), "scratch files left behind"
