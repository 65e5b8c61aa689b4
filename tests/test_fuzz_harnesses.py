"""libFuzzer harnesses of the helper core (tests/c/fuzz, host_shim/devtools/fuzz.py):
a short fuzzing run of each with a fixed seed, the seed corpora and the
regression inputs replayed, the dictionary checked against the ABI.
Long runs: ``ovmf-mh fuzz`` (docs/testing.md)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from helper import abi
from helper import stream as s
from host_shim.devtools import fuzz, fuzz_corpus, fuzz_planted

SHORT_RUN_SECONDS = 8


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_short_fuzz_run_finds_nothing(name: str, tmp_path: Path) -> None:
    result = fuzz.run(name, tmp_path, seconds=SHORT_RUN_SECONDS, seed=1)
    logs = "\n".join(log.read_text(errors="replace")[-3000:] for log in result.logs)
    assert not result.findings, f"{name}: findings {result.findings}; reproduce with " + "; ".join(
        fuzz.reproducer(name, p) for p in result.findings) + f"\n{logs}"
    assert result.executions > 0 and result.edges > 0, logs


def test_a_harness_started_by_a_large_process_is_not_out_of_memory(tmp_path: Path) -> None:
    """Linux carries the starting process's peak RSS into the harness's
    getrusage: started from a process that once held 2.6 GB, a harness with
    libFuzzer's default bound reported out-of-memory on its first input
    (seen in CI after the large-guest tests). Run from such a process, a
    short run and a replay find nothing."""
    script = f"""
import sys
from pathlib import Path
from host_shim.devtools import fuzz
held = bytearray(2600 << 20)
for offset in range(0, len(held), 4096):
    held[offset] = 1
del held
result = fuzz.run("request", Path({str(tmp_path)!r}), seconds=2, seed=1)
replayed = fuzz.replay("request", [fuzz.seed_dir("request")])
print(len(result.findings), result.executions, replayed.returncode)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr
    findings, executions, replay_code = map(int, done.stdout.split()[-3:])
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log"))
    assert (findings, replay_code) == (0, 0) and executions > 0, logs


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_seed_corpus_and_regression_inputs_replay_clean(name: str) -> None:
    inputs = [fuzz.seed_dir(name), *fuzz.regression_inputs(name)]
    result = fuzz.replay(name, inputs)
    assert result.returncode == 0, result.stderr[-4000:]
    expected = len(list(fuzz.seed_dir(name).iterdir())) + len(fuzz.regression_inputs(name))
    assert result.stderr.count("\nExecuted ") == expected, result.stderr[-4000:]


def test_every_harness_has_regression_inputs() -> None:
    for name in fuzz.TARGETS:
        assert fuzz.regression_inputs(name), f"tests/fuzz-regressions/{name}/ is empty"


def test_planted_inputs_match_their_script() -> None:
    assert fuzz_planted.main(["--check"]) == 0


def test_every_planted_input_has_its_defect() -> None:
    kept = {p for name in fuzz.TARGETS for p in fuzz.regression_inputs(name) if p.name.startswith("planted-")}
    proven = {entry.path for entry in fuzz_planted.PLANTED}
    # request's planted-* inputs predate host_shim/devtools/fuzz_planted.py and its input format did not change.
    assert {p for p in kept - proven if p.parent.name != "request"} == set()


@pytest.mark.parametrize("entry", fuzz_planted.PLANTED, ids=lambda e: f"{e.target}-{e.name}")
def test_planted_defect_is_caught_by_its_input(entry: fuzz_planted.Planted) -> None:
    """The harness built with the defect compiled in fails on the kept input,
    with the defect's own message: the input reaches the code the defect is
    in. (The real core replays it clean: the regression replay above.)"""
    result = fuzz_planted.replay_planted(entry)
    assert result.returncode != 0, f"{entry.name}: the planted defect went unnoticed\n{result.stderr[-3000:]}"
    assert entry.expect in result.stderr, result.stderr[-3000:]


def test_stream_seeds_are_real_streams_under_the_fixed_key() -> None:
    seeds = fuzz_corpus.stream_seeds()
    magic = abi.load().const("OVMF_MH_STREAM_MAGIC")
    for name, blob in seeds.items():
        assert struct.unpack_from("<Q", blob, 1)[0] == magic, name
        # export_stream() imported each one with the reference helper already;
        # a flipped tag byte must not import.
        stream = bytearray(blob[1:])
        stream[87] ^= 1
        with pytest.raises(RuntimeError, match="IMPORT_BEGIN"):
            fuzz_corpus._verify(bytes(stream), fuzz_corpus.STREAM_WINDOW_PAGES * fuzz_corpus.PAGE)


def test_stream_seed_reaches_a_completed_import_in_the_harness() -> None:
    """The harness must get through a whole seed (FUZZ_TRACE prints each command)."""
    seed = fuzz.seed_dir("stream") / "stream-3p-c00"
    result = subprocess.run([str(fuzz.build("stream")), "-runs=1", str(seed)], capture_output=True, text=True,
                            check=False, env=dict(os.environ, FUZZ_TRACE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    import_end = abi.load().const("OVMF_MH_CMD_IMPORT_END")
    assert f"command {import_end} (" in result.stderr and "-> status 0x0 results 0x3 " in result.stderr, result.stderr


def test_zero_range_seed_reaches_a_completed_import_in_the_harness() -> None:
    """The stream harness gets through a seed with ZERO_RANGE records: every
    record applied (its checker replayed each range) and the end verified."""
    seed = fuzz.seed_dir("stream") / "stream-zr-c00"
    blob = seed.read_bytes()
    records = s.split_records(blob[1 + s.STREAM_HEADER_SIZE : -s.END_RECORD_SIZE])
    ranges = [r for r in records if s.decode_record_header(r).type == s.RECORD_ZERO_RANGE]
    assert len(ranges) == len(fuzz_corpus.ZERO_RANGE_SEED)
    result = subprocess.run([str(fuzz.build("stream")), "-runs=1", str(seed)], capture_output=True, text=True,
                            check=False, env=dict(os.environ, FUZZ_TRACE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    a = abi.load()
    batch, end = a.const("OVMF_MH_CMD_IMPORT_BATCH"), a.const("OVMF_MH_CMD_IMPORT_END")
    lines = result.stderr.splitlines()
    assert any(f"command {batch} (" in line and f"-> status 0x0 results {len(records):#x} " in line
               for line in lines), result.stderr
    assert any(f"command {end} (" in line and f"-> status 0x0 results {len(records):#x} " in line
               for line in lines), result.stderr


def test_dictionary_comes_from_the_abi() -> None:
    text = fuzz_corpus.dictionary()
    a = abi.load()

    def escaped(value: int, width: int) -> str:
        return "".join(f"\\x{b:02x}" for b in value.to_bytes(width, "little"))

    assert escaped(a.const("OVMF_MH_STREAM_MAGIC"), 8) in text
    assert escaped(a.const("OVMF_MH_REQUEST_SIGNATURE"), 4) in text
    for name, value in a.constants.items():
        if name.startswith("OVMF_MH_CMD_"):
            assert f'{name.removeprefix("OVMF_MH_").lower()}_4="{escaped(value, 4)}"' in text


def test_every_surface_has_a_harness() -> None:
    assert not fuzz.MISSING
    assert fuzz.target("page-tables").core_files == ("PageTables.c",)
    with pytest.raises(fuzz.FuzzError, match="unknown fuzz target"):
        fuzz.target("no-such-surface")


@pytest.mark.parametrize(("seed", "status"), [("proof", "SUCCESS"), ("proof-forged", "BAD_COMMIT_PROOF")])
def test_commit_proof_seed_reaches_the_source_in_the_harness(seed: str, status: str) -> None:
    """The mailbox harness gets a commit through to the source's check of the
    proof (ABI 4.1): accepted as target helper 0 wrote it, refused forged."""
    path = fuzz.seed_dir("mailbox") / f"seq-3p-plain-{seed}"
    result = subprocess.run([str(fuzz.build("mailbox")), "-runs=1", str(path)], capture_output=True, text=True,
                            check=False, env=dict(os.environ, FUZZ_TRACE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    a = abi.load()
    verify, proof = a.const("OVMF_MH_CMD_EXPORT_VERIFY_COMMIT"), a.const("OVMF_MH_CMD_IMPORT_COMMIT_PROOF")
    lines = result.stderr.splitlines()
    assert any(f"command {proof} (" in line and "-> status 0x0 " in line for line in lines), result.stderr
    expected = a.const(f"OVMF_MH_STATUS_{status}")
    assert any(f"command {verify} (" in line and f"-> status {expected:#x} " in line for line in lines), result.stderr
