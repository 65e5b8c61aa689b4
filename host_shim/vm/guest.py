"""The small real guest used by boot tests: Debian's cloud kernel and an
initramfs built here around Debian's busybox-static (both fetched by
stuart/bootstrap.sh into .cache/guest)."""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
from pathlib import Path

from host_shim import paths
from host_shim.errors import SetupError

USERSPACE_MARKER = "OVMF-MH-GUEST: userspace reached"
KERNEL_APPEND = "console=ttyS0 panic=-1 rdinit=/init"

BOOT_CHECK_INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
echo "{USERSPACE_MARKER}, kernel $(/bin/busybox uname -r)"
/bin/busybox poweroff -f
"""


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SetupError(
            f"{what} not found at {path}: run stuart/bootstrap.sh (it fetches Debian's "
            "linux-image-cloud-amd64 and busybox-static into .cache/guest)"
        )
    return path


def kernel() -> Path:
    return _require(paths.GUEST_DIR / "vmlinuz", "guest kernel")


def busybox() -> Path:
    return _require(paths.GUEST_DIR / "busybox", "busybox-static")


class _CpioWriter:
    """Minimal 'newc' cpio writer: enough for an initramfs, no root needed."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        ]
        self._ino += 1
        header = b"070701" + b"".join(f"{f:08X}".encode() for f in fields)
        self._out.write(header + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, executable: bool = False) -> None:
        self._entry(name, 0o100755 if executable else 0o100644, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def initramfs(init_script: str, extra_files: dict[str, bytes] | None = None) -> Path:
    """A gzip'd initramfs with busybox and the given /init, cached by content."""
    box = busybox().read_bytes()
    extra = dict(sorted((extra_files or {}).items()))
    digest = hashlib.sha256(box + init_script.encode())
    for name, data in extra.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    out = paths.CACHE_DIR / "initramfs" / f"initramfs-{digest.hexdigest()[:16]}.cpio.gz"
    if out.is_file():
        return out
    cpio = _CpioWriter()
    for directory in ("bin", "dev", "proc", "sys", "tmp"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", box, executable=True)
    cpio.file("init", init_script.encode(), executable=True)
    for name, data in extra.items():
        cpio.file(name, data, executable=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    partial.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    partial.replace(out)
    return out


WORKLOAD_SOURCE = Path(__file__).with_name("guest_src") / "workload.c"
WORKLOAD_START = "WORKLOAD START"
HEARTBEAT = "HB seq="
CORRUPTION = "CORRUPTION"


def workload_binary() -> Path:
    """The static workload binary, compiled once with the host gcc (cached)."""
    source = WORKLOAD_SOURCE.read_bytes()
    out = paths.CACHE_DIR / "guest" / f"workload-{hashlib.sha256(source).hexdigest()[:16]}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    result = subprocess.run(
        ["gcc", "-O2", "-static", "-o", str(partial), str(WORKLOAD_SOURCE)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise SetupError(f"cannot build the guest workload (gcc -static): {result.stderr.strip()}")
    partial.replace(out)
    return out


def workload_initramfs(mib: int, pages_per_tick: int = 256, tick_ms: int = 50, aba_pages: int = 0) -> Path:
    """Initramfs whose /init runs the memory workload forever (with
    ``aba_pages``, also pages it keeps changing and changing back)."""
    init = (
        "#!/bin/busybox sh\n"
        "/bin/busybox mount -t proc proc /proc\n"
        "/bin/busybox mount -t sysfs sysfs /sys\n"
        f"exec /bin/workload {mib} {pages_per_tick} {tick_ms} {aba_pages}\n"
    )
    return initramfs(init, {"bin/workload": workload_binary().read_bytes()})
