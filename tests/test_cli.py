"""The command line: every option of every command and subcommand has help
text (with its default stated where it has one), every --help runs, and an
option that does not apply is refused rather than silently ignored."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_shim.cli import build_parser, main

OVMF_MH = Path(sys.executable).parent / "ovmf-mh"


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """The parser and, recursively, every subcommand's parser, with its words."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


PARSERS = dict(_parsers(build_parser()))


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        yield action


def _has_default(action: argparse.Action) -> bool:
    """Whether the option has a default a user should be told: not a flag
    that is simply off, not a required option, not "nothing"."""
    if action.required or action.default in (None, False, argparse.SUPPRESS):
        return False
    return not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def test_the_walk_finds_every_command() -> None:
    commands = {path for path in PARSERS if path}
    assert {("build",), ("boot",), ("inspect",), ("keygen",), ("export",), ("import",), ("send",),
            ("receive",), ("migrate",), ("bench",), ("bench", "crypto"), ("bench", "pipeline"),
            ("bench", "migrate"), ("guest", "start"), ("guest", "stop"), ("guest", "command")} <= commands


@pytest.mark.parametrize("path", list(PARSERS), ids=lambda p: " ".join(p) or "ovmf-mh")
def test_every_option_has_help_with_its_default(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    parser = PARSERS[path]
    missing = [a.dest for a in _options(parser) if not (a.help or "").strip()]
    assert not missing, f"ovmf-mh {' '.join(path)}: options without help text: {missing}"
    silent = [a.option_strings[0] for a in _options(parser)
              if _has_default(a) and "default" not in (a.help or "").lower()]
    assert not silent, f"ovmf-mh {' '.join(path)}: help does not state the default of {silent}"
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ovmf-mh")
    for action in _options(parser):
        for option in action.option_strings:
            assert option in out, f"{option} missing from ovmf-mh {' '.join(path)} --help"


def test_the_installed_command_prints_its_help() -> None:
    result = subprocess.run([str(OVMF_MH), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ovmf-mh")
    for command in ("build", "boot", "inspect", "keygen", "export", "import", "send", "receive", "migrate",
                    "bench"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["export", "import", "send", "receive"])
def test_image_with_a_helper_that_runs_no_firmware_is_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, ram, stream = tmp_path / "k.key", tmp_path / "src.ram", tmp_path / "s.omh"
    assert main(["keygen", "--out", str(key)]) == 0
    ram.write_bytes(bytes(8192))
    stream.write_bytes(b"")
    where = {"export": ["--out", str(stream)], "import": ["--in", str(stream)],
             "send": ["--to", "127.0.0.1:9"], "receive": ["--listen", "127.0.0.1:0"]}[command]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    code = main([command, "--ram", str(ram), "--key", str(key), *where, "--helper", "reference",
                 "--image", str(tmp_path / "some.fd"), "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 1
    assert "--image" in err and "applies to --helper firmware only" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused command left files behind"


@pytest.mark.parametrize("options", [["--guest-mib", "512"], ["--workload-mib", "32"],
                                     ["--to", "127.0.0.1:9", "--ram-dir", "/dev/shm"]])
def test_migrate_refuses_test_guest_options_with_an_attached_guest(
        options: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--qmp migrates the user's guest: the sizes and RAM folder of the guest
    the command would boot do not apply, and say so instead of being ignored."""
    capsys.readouterr()
    code = main(["migrate", "--qmp", str(tmp_path / "q.sock"), "--ram", str(tmp_path / "g.ram"),
                 "--key", str(tmp_path / "k.key"), "--work-dir", str(tmp_path / "w"), *options])
    err = capsys.readouterr().err
    assert code == 1
    assert options[-2] in err and "not apply with --qmp" in err
    assert not (tmp_path / "w").exists(), "a refused command left files behind"


@pytest.mark.parametrize("options", [["--qmp", "q.sock"], ["--ram", "g.ram"], ["--quit-source"]])
def test_migrate_attach_options_go_together(options: list[str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code = main(["migrate", "--work-dir", str(tmp_path / "w"), *options])
    err = capsys.readouterr().err
    assert code == 1
    assert "--qmp" in err and ("go together" in err or "applies to a guest attached" in err)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(("options", "says"), [
    (["--guest", "debian", "--qmp", "q.sock", "--ram", "g.ram"], "--guest debian boots the Debian guest here"),
    (["--disk", "d.qcow2"], "--disk is the disk of the Debian guest"),
    (["--client-rto-max-ms", "1000"], "--client-rto-max-ms is the TCP probe's client"),
    (["--guest", "debian", "--no-network", "--client-rto-max-ms", "1000"], "--client-rto-max-ms is the TCP probe's"),
    (["--nic", "tap:omh-tap0"], "--nic is the host side of the Debian guest's NIC"),
    (["--guest", "debian", "--nic", "tap:omh-tap0"], "--nic names the source host's side of the NIC with --to"),
    (["--guest", "debian", "--to", "127.0.0.1:9", "--nic", "bridge:br0"], "one of none, user, tap:NAME"),
])
def test_migrate_refuses_debian_options_that_do_not_fit(options: list[str], says: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code = main(["migrate", "--work-dir", str(tmp_path / "w"), *options])
    err = capsys.readouterr().err
    assert code == 1 and says in err, err
    assert not (tmp_path / "w").exists()


def test_boot_waits_for_the_debian_guest_as_long_as_migrate_does(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """The Debian guest's boot takes minutes under TCG: its default timeout
    is migrate's (60 s, the test guest's, failed it at 46 s into systemd)."""
    import host_shim.commands.boot_cmd as boot_cmd
    from host_shim.errors import OvmfMhError

    waited: list[float] = []

    def fake_boot(image: Path, mode: object, work: Path, timeout: float, guest_kind: str) -> None:
        waited.append(timeout)
        raise OvmfMhError("no QEMU in this test")

    monkeypatch.setattr(boot_cmd, "resolve_image", lambda image: tmp_path / "code.fd")
    monkeypatch.setattr(boot_cmd, "boot_image", fake_boot)
    for argv in (["--guest", "debian"], [], ["--guest", "debian", "--timeout", "5"]):
        assert main(["boot", "--mode", "normal", "--work-dir", str(tmp_path), *argv]) == 1
    assert waited == [600.0, 60.0, 5.0]


def test_guest_start_gives_a_nic_to_the_debian_guest_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code = main(["guest", "command", "--work-dir", str(tmp_path / "w"), "--nic", "tap:omh-tap0"])
    err = capsys.readouterr().err
    assert code == 1 and "the test guest has no NIC" in err, err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(("options", "says"), [
    (["migrate-incoming", "--disk", "{tmp}/absent.qcow2"], "absent.qcow2: not a file"),
    (["migrate-incoming", "--nic", "tap:omh-absent9"], "no network interface 'omh-absent9' in this host's network"),
    (["migrate", "--to", "127.0.0.1:9", "--guest", "debian", "--nic", "tap:omh-absent9"],
     "no network interface 'omh-absent9'"),
])
def test_a_missing_disk_or_tap_is_refused_before_anything_starts(options: list[str], says: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Said at once, not after a source connected (migrate-incoming) or the
    guest booted (migrate): the target's disk, a tap QEMU would open."""
    capsys.readouterr()
    argv = [option.format(tmp=tmp_path) for option in options]
    code = main([*argv, "--key", str(tmp_path / "k.key"), "--work-dir", str(tmp_path / "w"),
                 *(["--listen", "127.0.0.1:0"] if argv[0] == "migrate-incoming" else [])])
    err = capsys.readouterr().err
    assert code == 1 and says in err, err
    assert "listening on" not in err and not (tmp_path / "w").exists()
