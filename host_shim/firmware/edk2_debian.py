"""Fetch the newest EDK2 source package Debian actually serves: the second
EDK2 tree the tests build and boot (stuart/bootstrap.sh runs this).

The version is chosen by asking the registry, never pinned: deb-src entries
for Debian's unstable, testing and stable suites are derived from the
machine's own Debian sources entry (same mirror URI, no host name written
here) and queried with a private apt state under the cache folder, so the
machine's apt configuration is left alone. Versions are tried newest first;
a version whose tarballs the mirror does not serve (the listing can run ahead
of the pool) is reported and skipped. The ``.dsc`` is not needed: the orig and
debian tarballs are verified against the SHA-256 sums of the signed index,
unpacked, and Debian's patch series is applied with ``patch -p1``.

Result: ``.cache/edk2-newest/edk2-<version>/`` and ``.cache/edk2-newest/current``
naming it. Exit status 0 also when nothing is served (the message says so and
the second-tree tests skip); 1 only for a broken download or patch.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from host_shim import paths
from host_shim.errors import SetupError

PACKAGE = "edk2"
SUITES = ("unstable", "testing", "stable")
SOURCES_FILES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
RECHECK_SECONDS = 24 * 3600
CURRENT = "current"


def log(message: str) -> None:
    print(f"[setup] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SourceFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SourceVersion:
    version: str
    directory: str
    files: tuple[SourceFile, ...]

    def tarballs(self) -> tuple[SourceFile, ...]:
        """The orig and debian tarballs (the .dsc and signatures are not needed)."""
        return tuple(f for f in self.files if ".orig.tar." in f.name or ".debian.tar." in f.name)

    @property
    def upstream(self) -> str:
        return self.version.split(":", 1)[-1].rsplit("-", 1)[0]


def derive_mirror(sources_files: tuple[Path, ...] = SOURCES_FILES) -> str:
    """The Debian archive URI of the machine's own sources entry."""
    for path in sources_files:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if path.suffix == ".sources" and words[:1] == ["URIs:"]:
                uris = words[1:]
            elif words[:1] == ["deb"]:
                uris = [w for w in words[1:] if "://" in w][:1]
            else:
                continue
            for uri in uris:
                if not uri.rstrip("/").endswith("-security"):
                    return uri.rstrip("/")
    raise SetupError(f"no Debian archive URI found in {', '.join(map(str, sources_files))}")


class PrivateApt:
    """apt-get/apt-cache with a sources list and state of their own."""

    def __init__(self, root: Path, mirror: str) -> None:
        self.root = root
        self.mirror = mirror
        (root / "sources").mkdir(parents=True, exist_ok=True)
        (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "sources" / "deb-src.sources").write_text(
            f"Types: deb-src\nURIs: {mirror}\nSuites: {' '.join(SUITES)}\n"
            f"Components: main\nSigned-By: {KEYRING}\n"
        )

    def options(self) -> list[str]:
        return [
            "-o", "Dir::Etc::SourceList=/dev/null",
            "-o", f"Dir::Etc::SourceParts={self.root / 'sources'}",
            "-o", f"Dir::State::Lists={self.root / 'lists'}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", "Debug::NoLocking=1",
        ]

    def update(self) -> None:
        result = subprocess.run(
            ["apt-get", *self.options(), "update"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise SetupError(f"apt-get update for Debian's {'/'.join(SUITES)} sources failed:\n{result.stderr}")

    def showsrc(self, package: str) -> str:
        result = subprocess.run(
            ["apt-cache", *self.options(), "showsrc", package], capture_output=True, text=True, check=False
        )
        return result.stdout if result.returncode == 0 else ""


def parse_showsrc(text: str, package: str = PACKAGE) -> list[SourceVersion]:
    """Each distinct version of ``package`` in apt-cache showsrc output."""
    found: dict[str, SourceVersion] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, list[str]] = {}
        key = ""
        for line in stanza.splitlines():
            if line[:1].isspace() and key:
                fields[key].append(line.strip())
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = [value.strip()] if value.strip() else []
        if fields.get("Package") != [package] or "Version" not in fields or "Directory" not in fields:
            continue
        files = []
        for entry in fields.get("Checksums-Sha256", []):
            sha, size, name = entry.split()
            files.append(SourceFile(name, int(size), sha))
        version = SourceVersion(fields["Version"][0], fields["Directory"][0], tuple(files))
        if len(version.tarballs()) == 2:
            found.setdefault(version.version, version)
    return sorted(found.values(), key=functools.cmp_to_key(_compare), reverse=True)


def _compare(a: SourceVersion, b: SourceVersion) -> int:
    if a.version == b.version:
        return 0
    newer = subprocess.run(["dpkg", "--compare-versions", a.version, "gt", b.version], check=False)
    return 1 if newer.returncode == 0 else -1


def _url(mirror: str, version: SourceVersion, file: SourceFile) -> str:
    return f"{mirror}/{version.directory}/{urllib.parse.quote(file.name)}"


def _served(url: str) -> str | None:
    """None when the mirror serves url, else why not."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=60):
            return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, TimeoutError) as exc:
        return str(exc)


def newest_served(versions: list[SourceVersion], mirror: str) -> SourceVersion | None:
    """The newest version whose tarballs the mirror serves."""
    for version in versions:
        missing = [
            f"{file.name} ({why})"
            for file in version.tarballs()
            if (why := _served(_url(mirror, version, file))) is not None
        ]
        if not missing:
            return version
        log(f"{PACKAGE} {version.version} is listed but not served: {', '.join(missing)}; trying the next older")
    return None


def _download(url: str, file: SourceFile, dest: Path) -> None:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as response, dest.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if dest.stat().st_size != file.size or digest.hexdigest() != file.sha256:
        raise SetupError(f"{url}: size or SHA-256 differs from Debian's signed index")


def unpack(version: SourceVersion, downloads: Path, dest: Path) -> None:
    """Unpack the orig tarball into dest, the debian tarball inside it, then
    apply debian/patches/series in order."""
    orig, debian = sorted(version.tarballs(), key=lambda f: ".debian.tar." in f.name)
    unpacked = dest.parent / (dest.name + ".unpack")
    shutil.rmtree(unpacked, ignore_errors=True)
    unpacked.mkdir(parents=True)
    with tarfile.open(downloads / orig.name) as tar:
        tar.extractall(unpacked, filter="tar")
    tops = list(unpacked.iterdir())
    if len(tops) != 1 or not tops[0].is_dir():
        raise SetupError(f"{orig.name}: expected one top-level folder, found {[p.name for p in tops]}")
    tree = tops[0]
    with tarfile.open(downloads / debian.name) as tar:
        tar.extractall(tree, filter="tar")
    series = tree / "debian" / "patches" / "series"
    patches = [line.split()[0] for line in series.read_text().splitlines() if line.strip() and line[0] != "#"] \
        if series.is_file() else []
    for patch in patches:
        result = subprocess.run(
            ["patch", "-p1", "--forward", "--batch", "-s", "-i", str(tree / "debian" / "patches" / patch)],
            cwd=tree, capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise SetupError(f"Debian patch {patch} of {PACKAGE} {version.version} does not apply:\n{result.stdout}")
    log(f"applied {len(patches)} Debian patches to {PACKAGE} {version.version}")
    tree.rename(dest)
    unpacked.rmdir()


def fetch_newest(cache: Path, *, force_check: bool = False) -> Path | None:
    """Make cache/edk2-<version> the newest served Debian EDK2; return it."""
    cache.mkdir(parents=True, exist_ok=True)
    current_file = cache / CURRENT
    current = cache / current_file.read_text().strip() if current_file.is_file() else None
    checked = cache / "checked"
    if (
        current is not None and (current / paths.UPSTREAM_DSC).is_file() and not force_check
        and checked.is_file() and time.time() - checked.stat().st_mtime < RECHECK_SECONDS
    ):
        return current
    mirror = derive_mirror()
    apt = PrivateApt(cache / "apt", mirror)
    log(f"asking Debian ({mirror}, suites {' '.join(SUITES)}) for the newest {PACKAGE} source package")
    apt.update()
    versions = parse_showsrc(apt.showsrc(PACKAGE))
    log(f"{PACKAGE} versions listed: {', '.join(v.version for v in versions) or 'none'}")
    chosen = newest_served(versions, mirror)
    if chosen is None:
        log(f"no {PACKAGE} source package is served; keeping {current or 'nothing'} "
            "(the second-tree tests skip without a tree)")
        return current if current is not None and (current / paths.UPSTREAM_DSC).is_file() else None
    dest = cache / f"{PACKAGE}-{chosen.version.replace(':', '_')}"
    if not (dest / paths.UPSTREAM_DSC).is_file():
        downloads = cache / "downloads"
        downloads.mkdir(exist_ok=True)
        for file in chosen.tarballs():
            target = downloads / file.name
            if not target.is_file() or target.stat().st_size != file.size:
                log(f"downloading {file.name} ({file.size / 1e6:.1f} MB)")
                _download(_url(mirror, chosen, file), file, target.with_suffix(".partial"))
                target.with_suffix(".partial").rename(target)
        shutil.rmtree(dest, ignore_errors=True)
        unpack(chosen, downloads, dest)
    current_file.write_text(dest.name + "\n")
    checked.touch()
    log(f"second EDK2 tree: {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m host_shim.firmware.edk2_debian",
        description="Fetch the newest EDK2 source package Debian serves into a cache folder.",
    )
    parser.add_argument(
        "--cache", type=Path, default=paths.NEWEST_TREE_DIR,
        help=f"cache folder (default: {paths.NEWEST_TREE_DIR})",
    )
    parser.add_argument(
        "--recheck", action="store_true",
        help="ask the registry even when the cached tree was checked within the last 24 hours",
    )
    args = parser.parse_args(argv)
    try:
        tree = fetch_newest(args.cache, force_check=args.recheck)
    except (SetupError, OSError, urllib.error.URLError, tarfile.TarError) as exc:
        log(f"fetching the newest Debian {PACKAGE} failed: {exc}")
        return 1
    if tree is not None:
        print(tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
