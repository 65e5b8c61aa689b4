"""The Debian guest: its image recipe, its disk, its device model, and a boot
from the disk through the project's OVMF (normal mode, no -kernel)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from host_shim.errors import SetupError
from host_shim.firmware.boot import REMOVABLE_MEDIA_PATH, BootMode, boot_image
from host_shim.migration.migrate import MigrationConfig, migrate
from host_shim.vm import guest, guest_image
from host_shim.vm.devices import DeviceModel, NicBackend, parse_nic
from host_shim.vm.netns import L2Network


def test_mirror_entries_come_from_the_machines_deb822_entry(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb-src\nURIs: http://src.invalid/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.invalid/other\nSuites: trixie\nComponents: main contrib\n"
    )
    assert guest_image.mirror_entries((sources,)) == [
        "deb http://mirror.invalid/debian bookworm main",
        "deb http://mirror.invalid/debian bookworm-updates main",
    ]


def test_mirror_entries_read_the_one_line_format_and_refuse_none(tmp_path: Path) -> None:
    one_line = tmp_path / "sources.list"
    one_line.write_text("# comment\ndeb-src http://x.invalid/debian bookworm main\n"
                        "deb http://x.invalid/debian bookworm main contrib\n")
    assert guest_image.mirror_entries((tmp_path / "absent.sources", one_line)) == [
        "deb http://x.invalid/debian bookworm main contrib"]
    one_line.write_text("deb http://x.invalid/debian trixie main\n")
    with pytest.raises(SetupError, match="no Debian 'bookworm' entry"):
        guest_image.mirror_entries((one_line,))


def test_recipe_key_follows_the_recipe_not_the_prose(monkeypatch: pytest.MonkeyPatch) -> None:
    key = guest_image.recipe_key()
    assert guest_image.image_path().name == f"debian-{key}.raw"
    monkeypatch.setattr(guest_image, "PACKAGES", (*guest_image.PACKAGES, "socat"))
    assert guest_image.recipe_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(guest_image, "ROOT_FILES", {**guest_image.ROOT_FILES, "etc/motd": "hi\n"})
    assert guest_image.recipe_key() != key
    monkeypatch.undo()
    assert guest_image.recipe_key() == key


def test_device_model_boots_from_the_disk_with_virtio_devices() -> None:
    argv = DeviceModel(vcpus=2, disk=Path("/srv/vm/disk.qcow2"), nic=NicBackend("user")).qemu_args()
    text = shlex.join(argv)
    assert argv[:2] == ["-smp", "2"]
    assert "if=none,id=disk0,file=/srv/vm/disk.qcow2,format=qcow2" in text
    assert "virtio-blk-pci,drive=disk0,bootindex=1" in text
    assert "virtio-net-pci,mac=52:54:00:12:34:56,netdev=net0" in text
    assert "-netdev user,id=net0" in text
    assert "virtio-rng-pci,rng=rng0" in text
    # A NIC with no host side has no netdev; a tap names this host's own device.
    assert "-netdev" not in DeviceModel(disk=Path("/d")).qemu_args()
    assert "tap,id=net0,ifname=omh-tap0" in " ".join(NicBackend("tap", "omh-tap0").qemu_args("net0"))


def test_the_nic_host_side_is_none_user_or_a_named_tap() -> None:
    assert parse_nic("none") == NicBackend("none") and parse_nic("user") == NicBackend("user")
    assert parse_nic("tap:omh-tap0") == NicBackend("tap", "omh-tap0")
    for bad in ("tap:", "tap:a,script=/bin/sh", "tap:" + "x" * 16, "bridge:br0", "socket"):
        with pytest.raises(SetupError, match="one of none, user, tap:NAME"):
            parse_nic(bad)


@pytest.fixture(scope="module")
def debian_image() -> Path:
    """The cached Debian image (built here the first time: minutes, needs the mirror)."""
    return guest_image.build_image()


def _partitions(disk: Path) -> str:
    return subprocess.run(["sgdisk", "--print", str(disk)], capture_output=True, text=True, check=True).stdout


def test_image_has_a_gpt_esp_with_the_boot_loader_and_a_root_by_partuuid(debian_image: Path) -> None:
    table = _partitions(debian_image)
    assert "EF00" in table and "8304" in table, table
    info = subprocess.run(["sgdisk", "--info=2", str(debian_image)], capture_output=True, text=True,
                          check=True).stdout
    assert guest_image.root_partuuid().upper() in info.upper()
    esp = f"{debian_image}@@{guest_image.FIRST_LBA * 512}"
    listing = subprocess.run(["mdir", "-i", esp, "-b", "::/EFI/BOOT"], capture_output=True, text=True,
                             check=True).stdout
    assert "BOOTX64.EFI" in listing.upper()
    entry = subprocess.run(["mtype", "-i", esp, "::/loader/entries/ovmf-mh-debian.conf"], capture_output=True,
                           text=True, check=True).stdout
    assert f"root=PARTUUID={guest_image.root_partuuid()}" in entry and "console=ttyS0" in entry


@pytest.mark.qemu
def test_debian_guest_boots_from_its_disk_to_multi_user(firmware: Path, work_dir: Path,
                                                       debian_image: Path) -> None:
    outcome = boot_image(firmware, BootMode.NORMAL, work_dir, timeout=600, guest_kind="debian")
    assert outcome.ok, "\n".join(outcome.describe())
    cmdline = outcome.logs.cmdline.read_text()
    assert "-kernel" not in cmdline and "-initrd" not in cmdline, "the firmware boots the disk itself"
    assert "-smp 2" in cmdline and "virtio-blk-pci" in cmdline and "virtio-net-pci" in cmdline
    assert "memory-backend-file" in cmdline and "share=on" in cmdline
    debugcon = outcome.logs.debugcon.read_text()
    assert any("[Bds] Expand" in line and REMOVABLE_MEDIA_PATH in line for line in debugcon.splitlines())
    serial = outcome.logs.serial.read_text(errors="replace")
    assert "Debian GNU/Linux 12" in serial
    assert guest.HEARTBEAT in serial and guest.CORRUPTION not in serial
    assert any("bytes echoed back unchanged" in detail for detail in outcome.details), outcome.details


def _probe_digests(serial: str, what: str) -> list[str]:
    return re.findall(rf"{re.escape(what)} sha256=([0-9a-f]{{64}})", serial)


@pytest.mark.qemu
@pytest.mark.firmware
def test_the_debian_guest_migrates_with_its_devices_and_its_disk_reads_back_the_same(
        firmware: Path, work_dir: Path, debian_image: Path) -> None:
    """Both roles in one call, over the L2 network of namespaces: the Debian
    guest booted from its disk with 2 vCPUs and virtio disk, NIC (on a tap in
    each host's namespace) and RNG migrates through the helpers; the
    target's RAM equals the source's at switchover, its workload beats on,
    a TCP connection from the client namespace streams through the whole
    migration with every byte echoed in order and no reset, and the file
    the guest wrote and fsynced at boot reads back from the disk (O_DIRECT,
    past the guest's page cache) with the same digest on the target."""
    if os.geteuid() != 0:
        pytest.skip("the L2 network of namespaces needs root")
    # The default switchover: the dirty log of the source RAM file in the
    # work folder, as a user runs it (docs/migration.md, "Shared storage").
    with L2Network() as network:
        report = migrate(MigrationConfig(image=firmware, work_dir=work_dir, helpers=1, progress=False,
                                         guest="debian", guest_mib=512, vcpus=2, network=network))
    assert report.outcome == "ok", "\n".join(report.describe())
    assert report.switchover_check.startswith("dirty-log"), report.switchover_check
    assert report.ram_identical is True and report.guest_state == "running on target"
    assert report.target_heartbeat is not None and "errors=0" in report.target_heartbeat
    assert report.target is not None and report.target["guest"]["vcpus"] == 2
    assert [d["type"] for d in report.target["guest"]["devices"]] == ["virtio-blk-pci", "virtio-net-pci",
                                                                      "virtio-rng-pci"]
    target_cmdline = (work_dir / "target" / "qemu-cmdline.txt").read_text()
    assert "-kernel" not in target_cmdline and f"file={work_dir / 'disk.qcow2'}" in target_cmdline
    assert target_cmdline.startswith("nsenter --net=") and "ifname=omh-tap0" in target_cmdline
    probe = report.tcp_probe
    assert probe is not None and "error" not in probe, probe
    assert probe["bytes_sent"] > 0 and probe["bytes_echoed"] == probe["bytes_sent"], probe
    assert probe["in_order"] is True and probe["connection_reset"] is False, probe
    wrote = _probe_digests((work_dir / "source" / "serial.log").read_text(errors="replace"), guest_image.DISK_WROTE)
    assert len(wrote) == 1, "the guest wrote its probe file once, at boot on the source"
    # The target ran the guest on while the probe streamed on after 'cont'
    # (the disk probe reads every 2 s).
    checked = _probe_digests((work_dir / "target" / "serial.log").read_text(errors="replace"),
                             guest_image.DISK_CHECK)
    assert checked and set(checked) == set(wrote), (wrote, checked)
