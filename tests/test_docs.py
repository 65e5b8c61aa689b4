"""Docs that state what the code does, checked against the code: the
environment switches of docs/testing.md, the ABI version and the host's
timeouts in docs/mailbox.md."""

from __future__ import annotations

import inspect
import re

from helper import abi
from host_shim import paths
from host_shim.helpers.backends import MailboxBackend
from host_shim.helpers.mailbox import DEFAULT_TIMEOUT, Mailbox

DOCS = paths.REPO_ROOT / "docs"
#: How code reads an environment variable: os.environ.get("X"), os.environ["X"],
#: os.getenv("X"), env.setdefault("X", ...) on a copy of the environment, ${X:-} in shell.
ENV_READS = [
    re.compile(r"""environ(?:\.get)?[(\[]\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""getenv\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""env\.setdefault\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""\$\{([A-Z][A-Z0-9_]+):-"""),
]


def _env_reads() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    files = [*paths.REPO_ROOT.glob("host_shim/**/*.py"), *paths.REPO_ROOT.glob("helper/**/*.py"),
             *paths.REPO_ROOT.glob("stuart/*.py"), *paths.REPO_ROOT.glob("stuart/*.sh")]
    for path in files:
        text = path.read_text()
        for pattern in ENV_READS:
            for name in pattern.findall(text):
                found.setdefault(name, []).append(str(path.relative_to(paths.REPO_ROOT)))
    return found


def _documented_switches() -> set[str]:
    text = (DOCS / "testing.md").read_text()
    section = text.split("## Environment switches", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}


def test_the_scan_finds_the_known_switches() -> None:
    """The scan itself can see: a scan that found nothing would pass below."""
    assert {"EDK2_PATH", "OVMF_MH_QEMU", "OVMF_MH_KEEP_RAM", "OVMF_MH_BOOT_TIMEOUT"} <= set(_env_reads())


def test_every_environment_switch_is_documented() -> None:
    undocumented = {name: where for name, where in _env_reads().items() if name not in _documented_switches()}
    assert not undocumented, f"read by the code, missing from docs/testing.md: {undocumented}"


def test_no_documented_switch_is_gone() -> None:
    stale = _documented_switches() - set(_env_reads())
    assert not stale, f"docs/testing.md lists switches no code reads: {stale}"


def _default(function: object, parameter: str) -> float:
    value = inspect.signature(function).parameters[parameter].default  # type: ignore[arg-type]
    assert isinstance(value, (int, float)), f"{function}: {parameter} has no numeric default"
    return float(value)


def test_mailbox_doc_states_the_abi_version_of_the_header() -> None:
    text = (DOCS / "mailbox.md").read_text()
    a = abi.load()
    major, minor = a.const("OVMF_MH_ABI_MAJOR"), a.const("OVMF_MH_ABI_MINOR")
    assert f"| `AbiMajor` | helper | {major} (`OVMF_MH_ABI_MAJOR`)" in text
    assert f"| `AbiMinor` | helper | {minor} (`OVMF_MH_ABI_MINOR`)" in text
    assert f"## Commands (ABI {major}.{minor})" in text


def test_mailbox_doc_states_the_host_timeouts_of_the_code() -> None:
    section = (DOCS / "mailbox.md").read_text().split("## Timeouts", 1)[1]
    flat = " ".join(section.split())
    assert _default(Mailbox.call, "timeout") == _default(Mailbox.post_and_wait, "timeout") == DEFAULT_TIMEOUT
    assert _default(MailboxBackend.__init__, "timeout") == DEFAULT_TIMEOUT
    assert f"`DEFAULT_TIMEOUT` in `host_shim/helpers/mailbox.py`, currently {DEFAULT_TIMEOUT:g} s" in flat
    assert "`--mailbox-timeout SECONDS`" in flat
    ready = re.search(r"waits up to (\d+) s for `READY` when a transfer or migration starts its helpers", flat)
    assert ready is not None
    backends = (paths.REPO_ROOT / "host_shim" / "helpers" / "backends.py").read_text()
    assert f"wait_ready({ready.group(1)})" in backends
