#!/usr/bin/env bash
# Installs what ovmf-mh needs on a Debian 12 machine. Idempotent: every step
# checks before it acts, so running it again costs a few seconds.
#
#   1. Debian packages (QEMU, nasm, iasl, uuid-dev, build tools).
#   2. A deb-src entry derived from the machine's own Debian sources entry,
#      so that `apt-get source edk2` works without naming a mirror here.
#   3. The EDK2 source (Debian's edk2 source package) in .cache/edk2-src,
#      unless EDK2_PATH points at a tree of the user's own.
#   4. A Debian cloud kernel and busybox-static for the boot tests, in
#      .cache/guest.
#      The tools that build the Debian guest's disk image (mmdebstrap, mtools,
#      dosfstools, gdisk, e2fsprogs); the image itself is built on first use
#      (`ovmf-mh guest image`, host_shim/vm/guest_image.py) into .cache/guest-debian.
#   5. The project virtual environment in .venv.
#   6. A second EDK2 tree for the tests: the newest edk2 source package Debian
#      serves (chosen by asking the registry, see host_shim/firmware/edk2_debian.py),
#      in .cache/edk2-newest. OVMF_MH_SECOND_TREE=0 skips it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache="$repo/.cache"
mkdir -p "$cache"

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

packages=(qemu-system-x86 qemu-utils nasm acpica-tools uuid-dev dpkg-dev ovmf
          build-essential python3-venv cpio)
# the Debian guest's disk image (host_shim/vm/guest_image.py): root, FAT, GPT, ext4
packages+=(mmdebstrap mtools dosfstools gdisk e2fsprogs)
# libFuzzer harnesses (tests/c/fuzz): clang, its fuzzer/sanitizer runtimes, llvm-cov
packages+=(clang-14 libclang-rt-14-dev llvm-14)
# qemu-x86_64 (user-mode TCG): the page-crypto paths run under QEMU's TCG AES helpers (tests/test_crypto_vaes.py)
packages+=(qemu-user)

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq >&2
        apt_updated=1
    fi
}

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update_once
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >&2
fi

# --- deb-src entry, derived from the existing deb822 entries -------------
src_list=/etc/apt/sources.list.d/ovmf-mh-deb-src.sources
if [ ! -f "$src_list" ]; then
    origin=""
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        [ -s "$f" ] && { origin=$f; break; }
    done
    [ -n "$origin" ] || { log "no Debian sources entry found to derive deb-src from"; exit 1; }
    log "adding deb-src entries derived from $origin"
    if [[ "$origin" == *.sources ]]; then
        sed -e 's/^Types:.*/Types: deb-src/' "$origin" | as_root tee "$src_list" >/dev/null
    else
        # one-line format: turn 'deb URI SUITE COMP' into deb822 deb-src stanzas
        grep -E '^deb ' "$origin" | while read -r _ uri suite comps; do
            printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: %s\n\n' \
                "$uri" "$suite" "$comps"
        done | as_root tee "$src_list" >/dev/null
    fi
    apt_updated=0
fi

# --- EDK2 source -----------------------------------------------------------
if [ -n "${EDK2_PATH:-}" ]; then
    [ -f "$EDK2_PATH/OvmfPkg/OvmfPkgX64.dsc" ] || {
        log "EDK2_PATH=$EDK2_PATH does not hold an EDK2 tree (no OvmfPkg/OvmfPkgX64.dsc)"
        exit 1
    }
    log "using EDK2 tree from EDK2_PATH=$EDK2_PATH"
else
    edk2_src="$cache/edk2-src"
    if ! ls -d "$edk2_src"/edk2-*/OvmfPkg >/dev/null 2>&1; then
        apt_update_once
        rm -rf "$edk2_src.partial"
        mkdir -p "$edk2_src.partial"
        log "fetching Debian's edk2 source package (apt-get source edk2)"
        (cd "$edk2_src.partial" && apt-get source -qq edk2 >&2) || {
            log "apt-get source edk2 failed. Set EDK2_PATH to an EDK2 tree (edk2-stable202211 to"
            log "current upstream, with submodules; see docs/build.md) or make a deb-src entry"
            log "reachable, then run again."
            exit 1
        }
        rm -rf "$edk2_src"
        mv "$edk2_src.partial" "$edk2_src"
    fi
fi

# --- guest kernel and busybox for boot tests ------------------------------
guest="$cache/guest"
if [ ! -f "$guest/vmlinuz" ] || [ ! -x "$guest/busybox" ]; then
    apt_update_once
    rm -rf "$guest.partial"
    mkdir -p "$guest.partial/debs"
    kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$kernel_pkg" ] || { log "cannot resolve linux-image-cloud-amd64"; exit 1; }
    log "downloading $kernel_pkg and busybox-static"
    (cd "$guest.partial/debs" && apt-get download -qq "$kernel_pkg" busybox-static >&2)
    for deb in "$guest.partial"/debs/*.deb; do
        dpkg-deb -x "$deb" "$guest.partial/root"
    done
    cp "$guest.partial"/root/boot/vmlinuz-* "$guest.partial/vmlinuz"
    cp "$guest.partial/root/bin/busybox" "$guest.partial/busybox"
    rm -rf "$guest.partial/root" "$guest.partial/debs"
    rm -rf "$guest"
    mv "$guest.partial" "$guest"
fi

# --- project virtual environment ------------------------------------------
venv="$repo/.venv"
stamp="$venv/.ovmf-mh-installed"
if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
    log "installing the project into $venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -e "$repo[dev]" >&2
    touch "$stamp"
fi

# --- second EDK2 tree: the newest edk2 source package Debian serves --------
if [ "${OVMF_MH_SECOND_TREE:-1}" != 0 ]; then
    (cd "$repo" && "$venv/bin/python" -m host_shim.firmware.edk2_debian >/dev/null) \
        || log "no second EDK2 tree (see the lines above); tests/test_second_tree.py will skip"
fi
log "system set-up complete"
