"""The Debian guest: a Debian 12 system on a raw GPT disk, made from Debian's
packages without mounting anything, booted by OVMF through BDS from the disk.

Recipe (docs/migration.md, "Migrate a real VM"):

1. ``mmdebstrap`` (bookworm, minbase) builds the root from the mirror named by
   the machine's own Debian sources entry (read at run time, never written
   into the project), with the packages in :data:`PACKAGES`.
2. The project's files go into that root: the workload service (the same
   heartbeat on the serial console as the test guest), a TCP echo service
   (systemd socket activation, no extra package), a static address on the
   virtio NIC (systemd-networkd), a marker printed once multi-user.target is
   reached, and masks for what only slows a boot.
3. The EFI system partition is a FAT image filled with ``mtools``:
   systemd-boot at the removable-media path ``\\EFI\\BOOT\\BOOTX64.EFI``, a
   loader entry booting the kernel and initramfs with ``console=ttyS0`` and
   ``root=PARTUUID=``; the root is an ext4 image made by ``mkfs.ext4 -d``.
4. ``sgdisk`` writes the GPT of a sparse raw file; both images go in place.

The result is cached in ``.cache/guest-debian/debian-<key>.raw``, the key a
digest of this recipe (its data and version, the workload's source),
not of the mirror's daily state: once built, no network is needed. Runs use a
copy-on-write overlay (:func:`overlay`), so the cached image never changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from host_shim import paths
from host_shim.errors import SetupError
from host_shim.vm import guest

IMAGE_DIR = paths.CACHE_DIR / "guest-debian"
SUITE = "bookworm"
PACKAGES = ("systemd-sysv", "udev", "initramfs-tools", "linux-image-cloud-amd64", "systemd-boot-efi")
#: Tools the build runs, and the Debian package each comes from (stuart/bootstrap.sh installs them).
TOOLS = {"mmdebstrap": "mmdebstrap", "mkfs.fat": "dosfstools", "mmd": "mtools", "mcopy": "mtools",
         "sgdisk": "gdisk", "mkfs.ext4": "e2fsprogs"}

MIB = 1024 * 1024
ESP_MIB = 96
ROOT_MIB = 1536
#: First partition at 1 MiB; the backup GPT needs the last 33 sectors.
FIRST_LBA = 2048
DISK_BYTES = (1 + ESP_MIB + ROOT_MIB + 1) * MIB

#: The guest's address on its virtio NIC (a private one, only ever used on
#: networks the project creates: QEMU's user network has the same layout).
GUEST_ADDRESS = "10.0.2.15/24"
GUEST_GATEWAY = "10.0.2.2"
ECHO_PORT = 7
WORKLOAD_MIB = 64
MULTI_USER_MARKER = "OVMF-MH-DEBIAN: multi-user.target reached"
SERIAL = "/dev/ttyS0"
DISK_PROBE_FILE = "/var/lib/ovmf-mh/probe"
DISK_WROTE = "OVMF-MH-DISK wrote"
DISK_CHECK = "OVMF-MH-DISK check"

_KERNEL_OPTIONS = "rw console=ttyS0 panic=-1 fsck.mode=skip"
_NAMESPACE = uuid.UUID("6b0f3c2e-0d0e-4f55-9a51-6f766d662d6d")


def _unit(description: str, body: str, wanted_by: str = "multi-user.target") -> str:
    return f"[Unit]\nDescription={description}\n{body}\n[Install]\nWantedBy={wanted_by}\n"


#: Files the recipe writes into the root, by path (text).
ROOT_FILES: dict[str, str] = {
    "etc/hostname": "ovmf-mh-debian\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 ovmf-mh-debian\n",
    "etc/systemd/system/ovmf-mh-workload.service": _unit(
        "ovmf-mh workload: rewrites and checks memory, heartbeat on the serial console",
        "After=multi-user.target\n\n[Service]\n"
        f"ExecStart=/usr/local/bin/ovmf-mh-workload {WORKLOAD_MIB} 256 50 0\n"
        f"StandardOutput=file:{SERIAL}\nStandardError=file:{SERIAL}\nRestart=no\n",
    ),
    "usr/local/bin/ovmf-mh-ready": (
        "#!/bin/sh\n"
        f"read -r up _ < /proc/uptime\necho \"{MULTI_USER_MARKER}, uptime $up s\" > {SERIAL}\n"
    ),
    "etc/systemd/system/ovmf-mh-ready.service": _unit(
        "ovmf-mh: say on the serial console that multi-user.target is reached",
        "After=multi-user.target\n\n[Service]\nType=oneshot\nExecStart=/usr/local/bin/ovmf-mh-ready\n",
    ),
    "usr/local/bin/ovmf-mh-disk-probe": (
        "#!/bin/sh\n"
        "# Writes a file once and fsyncs it; then reads it back from the disk\n"
        "# (O_DIRECT, past the guest's page cache) every 2 s and prints its digest.\n"
        f"f={DISK_PROBE_FILE}\nmkdir -p \"${{f%/*}}\"\n"
        "if [ ! -s \"$f\" ]; then\n"
        "  dd if=/dev/urandom of=\"$f\" bs=1M count=1 iflag=fullblock conv=fsync 2>/dev/null && sync \"${f%/*}\"\n"
        "  s=$(sha256sum < \"$f\")\n"
        f"  echo \"{DISK_WROTE} sha256=${{s%% *}}\" > {SERIAL}\n"
        "fi\n"
        "while :; do\n"
        "  s=$(dd if=\"$f\" iflag=direct bs=1M 2>/dev/null | sha256sum)\n"
        f"  echo \"{DISK_CHECK} sha256=${{s%% *}}\" > {SERIAL}\n"
        "  sleep 2\n"
        "done\n"
    ),
    "etc/systemd/system/ovmf-mh-disk-probe.service": _unit(
        "ovmf-mh disk probe: a file written and fsynced once, read back from the disk every 2 s",
        "After=multi-user.target\n\n[Service]\nExecStart=/usr/local/bin/ovmf-mh-disk-probe\n",
    ),
    "etc/systemd/system/ovmf-mh-echo.socket": _unit(
        "ovmf-mh TCP echo service",
        f"\n[Socket]\nListenStream={ECHO_PORT}\nAccept=yes\n",
        wanted_by="sockets.target",
    ),
    "etc/systemd/system/ovmf-mh-echo@.service": (
        "[Unit]\nDescription=ovmf-mh TCP echo connection\n\n[Service]\n"
        "ExecStart=/bin/cat\nStandardInput=socket\nStandardOutput=socket\n"
    ),
    "etc/systemd/network/10-ovmf-mh.network": (
        "[Match]\nType=ether\n\n[Network]\n"
        f"Address={GUEST_ADDRESS}\nGateway={GUEST_GATEWAY}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"
    ),
    "etc/systemd/journald.conf.d/ovmf-mh.conf": "[Journal]\nStorage=volatile\n",
}
UNITS_ENABLED = {
    "multi-user.target.wants": ("ovmf-mh-workload.service", "ovmf-mh-ready.service",
                                "ovmf-mh-disk-probe.service"),
    "sockets.target.wants": ("ovmf-mh-echo.socket",),
}
#: systemd's own units to enable by link (as 'systemctl enable' would).
SYSTEM_UNITS_ENABLED = {
    "multi-user.target.wants": ("systemd-networkd.service",),
    "sockets.target.wants": ("systemd-networkd.socket",),
}
#: What only slows the boot of a test VM (no login, no timers, no waiting for the network).
UNITS_MASKED = (
    "getty@tty1.service", "serial-getty@ttyS0.service", "apt-daily.timer", "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer", "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer",
    "systemd-networkd-wait-online.service", "systemd-timesyncd.service", "systemd-random-seed.service",
    "getty-static.service", "modprobe@dm_mod.service", "modprobe@fuse.service", "modprobe@efi_pstore.service",
    "modprobe@drm.service", "modprobe@loop.service", "modprobe@configfs.service",
    "sys-fs-fuse-connections.mount", "sys-kernel-config.mount", "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount", "dev-hugepages.mount", "dev-mqueue.mount", "systemd-pstore.service",
    "systemd-journal-flush.service", "systemd-update-utmp.service", "systemd-update-utmp-runlevel.service",
    "systemd-tmpfiles-clean.timer", "proc-sys-fs-binfmt_misc.automount", "systemd-binfmt.service",
)


#: Bump when a build step below changes what it makes (the data above is digested as it is).
RECIPE_VERSION = 1


def recipe_key() -> str:
    """Digest of what decides the image: the recipe's data, its version, and
    the workload's source (not the mirror's daily state, not this file's prose)."""
    recipe = repr((RECIPE_VERSION, SUITE, PACKAGES, ESP_MIB, ROOT_MIB, ROOT_FILES, UNITS_ENABLED,
                   SYSTEM_UNITS_ENABLED, UNITS_MASKED, _KERNEL_OPTIONS))
    digest = hashlib.sha256(recipe.encode())
    digest.update(guest.WORKLOAD_SOURCE.read_bytes())
    return digest.hexdigest()[:16]


def image_path() -> Path:
    return IMAGE_DIR / f"debian-{recipe_key()}.raw"


def _uuid(name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{recipe_key()}:{name}"))


def root_partuuid() -> str:
    return _uuid("root-partition")


def kernel_command_line() -> str:
    return f"root=PARTUUID={root_partuuid()} {_KERNEL_OPTIONS}"


def mirror_entries(sources: tuple[Path, ...] = (Path("/etc/apt/sources.list.d/debian.sources"),
                                                  Path("/etc/apt/sources.list"))) -> list[str]:
    """One-line apt entries for SUITE from the machine's own Debian sources
    (deb822 or one-line format): the mirror is this machine's choice."""
    entries: list[str] = []
    for source in sources:
        try:
            text = source.read_text()
        except OSError:
            continue
        if source.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
                if "deb" not in fields.get("Types", "").split():
                    continue
                for uri in fields.get("URIs", "").split():
                    for suite in fields.get("Suites", "").split():
                        if suite.startswith(SUITE):
                            entries.append(f"deb {uri} {suite} {fields.get('Components', 'main')}")
        else:
            for line in text.splitlines():
                words = line.split()
                if len(words) >= 4 and words[0] == "deb" and words[2].startswith(SUITE):
                    entries.append(" ".join(words))
        if entries:
            return entries
    raise SetupError(
        f"no Debian '{SUITE}' entry found in {', '.join(map(str, sources))}: the Debian guest's root is "
        "built from the mirror the machine's own apt sources name"
    )


def _require_tools() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise SetupError(f"building the Debian guest image needs {', '.join(missing)}: run stuart/bootstrap.sh")
    if os.geteuid() != 0:
        raise SetupError("building the Debian guest image needs root (mmdebstrap in root mode, "
                         "file ownership in the ext4 image)")


def _run(argv: list[str], what: str, log: Path) -> None:
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                check=False)
    if result.returncode != 0:
        raise SetupError(f"{what} failed (exit {result.returncode}); log: {log}")


def root_tarball() -> Path:
    """The mmdebstrap result, cached by suite and package list alone: a
    change of the project's files in the image rebuilds from it offline."""
    key = hashlib.sha256(repr((SUITE, PACKAGES, _MMDEBSTRAP_OPTIONS)).encode()).hexdigest()[:16]
    return IMAGE_DIR / f"root-{key}.tar"


_MMDEBSTRAP_OPTIONS = ("--variant=minbase", "--dpkgopt=path-exclude=/usr/share/man/*",
                       "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/locale/*")


def _bootstrap_root(root: Path, log: Path, say: Callable[[str], None]) -> None:
    tarball = root_tarball()
    if not tarball.is_file():
        say(f"mmdebstrap {SUITE} ({len(PACKAGES)} packages and their dependencies) into {tarball.name}")
        partial = tarball.with_suffix(".partial.tar")
        partial.unlink(missing_ok=True)
        _run(["mmdebstrap", *_MMDEBSTRAP_OPTIONS, f"--include={','.join(PACKAGES)}", SUITE, str(partial),
              *mirror_entries()], "mmdebstrap", log)
        partial.replace(tarball)
    root.mkdir()
    _run(["tar", "-C", str(root), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(tarball)],
         "tar -x of the root", log)


def _link(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def _customise_root(root: Path) -> None:
    for name, text in ROOT_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if name.startswith("usr/local/bin/"):
            path.chmod(0o755)
    (root / "etc/fstab").write_text(f"PARTUUID={root_partuuid()} / ext4 rw,errors=remount-ro 0 0\n")
    workload = root / "usr/local/bin/ovmf-mh-workload"
    workload.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(guest.workload_binary(), workload)
    workload.chmod(0o755)
    system = root / "etc/systemd/system"
    for wants, units in UNITS_ENABLED.items():
        for unit in units:
            _link(system / wants / unit, f"/etc/systemd/system/{unit}")
    for wants, units in SYSTEM_UNITS_ENABLED.items():
        for unit in units:
            _link(system / wants / unit, f"/lib/systemd/system/{unit}")
    for unit in UNITS_MASKED:
        _link(system / unit, "/dev/null")


def _boot_files(root: Path) -> tuple[Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise SetupError(f"expected one kernel and one initramfs in {root / 'boot'}, found "
                         f"{[p.name for p in kernels + initrds]}")
    return kernels[0], initrds[0]


def _make_esp(root: Path, esp: Path, log: Path) -> None:
    kernel, initrd = _boot_files(root)
    loader = root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    volume_id = _uuid("esp-volume").replace("-", "")[:8]
    esp.unlink(missing_ok=True)
    _run(["mkfs.fat", "-F", "32", "-n", "ESP", "-i", volume_id, "-C", str(esp), str(ESP_MIB * 1024)],
         "mkfs.fat", log)
    env_image = ["-i", str(esp)]
    _run(["mmd", *env_image, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"], "mmd", log)
    staging = esp.with_suffix(".files")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    (staging / "loader.conf").write_text("default ovmf-mh-debian.conf\ntimeout 0\nconsole-mode keep\n")
    (staging / "entry.conf").write_text(
        "title Debian 12 (ovmf-mh)\nlinux /vmlinuz\ninitrd /initrd.img\n"
        f"options {kernel_command_line()}\n"
    )
    copies = [(loader, "::/EFI/BOOT/BOOTX64.EFI"), (kernel, "::/vmlinuz"), (initrd, "::/initrd.img"),
              (staging / "loader.conf", "::/loader/loader.conf"),
              (staging / "entry.conf", "::/loader/entries/ovmf-mh-debian.conf")]
    for source, dest in copies:
        _run(["mcopy", *env_image, str(source), dest], f"mcopy {dest}", log)
    shutil.rmtree(staging)


def _make_root_fs(root: Path, image: Path, log: Path) -> None:
    image.unlink(missing_ok=True)
    _run(["mkfs.ext4", "-q", "-F", "-L", "debian-root", "-U", _uuid("root-fs"), "-d", str(root),
          str(image), f"{ROOT_MIB}M"], "mkfs.ext4 -d", log)


def _place(part: Path, disk: Path, offset: int) -> None:
    """Copy a partition image into the disk at ``offset``: only its data
    ranges (SEEK_DATA/SEEK_HOLE), so the disk stays as sparse as the image."""
    with part.open("rb") as src, disk.open("r+b") as dst:
        size = os.fstat(src.fileno()).st_size
        position = 0
        while position < size:
            try:
                start = os.lseek(src.fileno(), position, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after position
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < end:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), end - start, start, offset + start)
                if copied <= 0:
                    raise SetupError(f"copying {part} into {disk} stopped at byte {start} of {end}")
                start += copied
            position = end


def _make_disk(esp: Path, root_fs: Path, disk: Path, log: Path) -> None:
    disk.unlink(missing_ok=True)
    with disk.open("wb") as f:
        f.truncate(DISK_BYTES)
    esp_first = FIRST_LBA
    esp_last = esp_first + ESP_MIB * 2048 - 1
    root_first = esp_last + 1
    root_last = root_first + ROOT_MIB * 2048 - 1
    _run(["sgdisk", "--clear", f"--disk-guid={_uuid('disk')}",
          f"--new=1:{esp_first}:{esp_last}", "--typecode=1:ef00", "--change-name=1:EFI system",
          f"--partition-guid=1:{_uuid('esp-partition')}",
          f"--new=2:{root_first}:{root_last}", "--typecode=2:8304", "--change-name=2:root",
          f"--partition-guid=2:{root_partuuid()}", str(disk)], "sgdisk", log)
    _place(esp, disk, esp_first * 512)
    _place(root_fs, disk, root_first * 512)


def _say(message: str) -> None:
    print(f"[guest image] {message}", file=sys.stderr, flush=True)


def build_image(force: bool = False, say: Callable[[str], None] = _say) -> Path:
    """The cached Debian disk image, built first if the recipe changed (or ``force``)."""
    disk = image_path()
    if disk.is_file() and not force:
        return disk
    _require_tools()
    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    work = IMAGE_DIR / f"build-{recipe_key()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    log = IMAGE_DIR / f"build-{recipe_key()}.log"
    log.write_text("")
    start = time.monotonic()
    steps: list[tuple[str, Callable[[], None]]] = [
        ("Debian root (mmdebstrap, cached)", lambda: _bootstrap_root(work / "root", log, say)),
        ("adding the workload, echo and network services", lambda: _customise_root(work / "root")),
        ("EFI system partition (mtools)", lambda: _make_esp(work / "root", work / "esp.img", log)),
        ("ext4 root (mkfs.ext4 -d)", lambda: _make_root_fs(work / "root", work / "root.img", log)),
        ("GPT disk", lambda: _make_disk(work / "esp.img", work / "root.img", work / "disk.raw", log)),
    ]
    for number, (what, step) in enumerate(steps, 1):
        say(f"step {number}/{len(steps)}: {what} ({time.monotonic() - start:.0f} s so far; log {log})")
        step()
    (work / "disk.raw").replace(disk)
    shutil.rmtree(work, ignore_errors=True)
    for stale in [*IMAGE_DIR.glob("debian-*.raw"), *IMAGE_DIR.glob("root-*.tar")]:
        if stale not in (disk, root_tarball()):
            stale.unlink(missing_ok=True)
    say(f"built {disk} in {time.monotonic() - start:.0f} s")
    return disk


def overlay(path: Path, base: Path | None = None) -> Path:
    """A fresh qcow2 overlay at ``path`` over the cached raw image: the guest
    writes there, the cached image stays as built."""
    backing = base if base is not None else build_image()
    path.unlink(missing_ok=True)
    result = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(path)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise SetupError(f"qemu-img create of the guest disk overlay {path} failed: {result.stderr.strip()}")
    return path
