"""Read an OVMF flash image without running it: its firmware volumes, its SEC
module and, when present, the migration helper's OVMF_MH_IMAGE_INFO record.

The walk follows the PI specification: firmware volumes (FV) hold FFS files,
files hold sections, and sections may encapsulate further sections (GUID-defined
LZMA sections, uncompressed compression sections) or whole firmware volumes
(FIRMWARE_VOLUME_IMAGE sections). Top-level volumes are found by scanning the
file for the "_FVH" signature; everything below them is reached by walking the
structures, never by scanning.

Every read is bounds checked: a file that is not a firmware image, or one that
is truncated or corrupt, raises :class:`~host_shim.errors.ImageFormatError`
with the offset and the check that failed.

The helper record is located by its 16-byte signature inside the SEC module's
PE32 (or TE) image. Its layout and constants come from HelperAbi.h through
:mod:`helper.abi`. BuildIdAddress is an absolute address in the SEC image as
it runs in place from flash, so ``BuildIdAddress - ImageBase`` is an RVA into
that image.
"""

from __future__ import annotations

import io
import lzma
import struct
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pefile  # type: ignore[import-untyped]
from edk2toollib.uefi.pi_firmware_file import (  # type: ignore[import-untyped]
    EfiFirmwareFileSystemHeader,
)
from edk2toollib.uefi.pi_firmware_volume import (  # type: ignore[import-untyped]
    EFI_FVH_SIGNATURE,
    EfiFirmwareVolumeExtHeader,
    EfiFirmwareVolumeHeader,
    EfiSystemNvDataFvGuid,
)

from helper import abi as abi_module
from host_shim.errors import ImageFormatError, SevMetadataError
from host_shim.firmware.sev_metadata import FOUR_GB, SevLaunchInfo, read_sev_launch_info

REPORT_FORMAT = "ovmf-mh-inspect/1"

#: OvmfPkg/Sec/SecMain.inf FILE_GUID: the SEC module of OVMF (stock or ovmf-mh).
SEC_MAIN_FILE_GUID = uuid.UUID("df1ccef6-f301-4a63-9661-fc6030dcc880")

# --- PI specification constants (Volume 3: firmware storage) ---------------
FFS2_GUID = uuid.UUID("8c8ce578-8a3d-4f1c-9935-896185c32dd3")
FFS3_GUID = uuid.UUID("5473c07a-3dcb-4dca-bd6f-1e9689e7349a")
LZMA_SECTION_GUID = uuid.UUID("ee4e5898-3914-4259-9d6e-dc7bd79403cf")
LZMA_F86_SECTION_GUID = uuid.UUID("d42ae6bd-1352-4bfb-909a-ca72a6eae889")
TIANO_SECTION_GUID = uuid.UUID("a31280ad-481e-41b6-95e8-127f4c984779")
BROTLI_SECTION_GUID = uuid.UUID("3d532050-5cda-4fd0-879e-0f7f630d5afb")
CRC32_SECTION_GUID = uuid.UUID("fc1bcdb0-7d31-49aa-936a-a4600d9dd083")

_FILE_SYSTEM_NAMES = {
    FFS2_GUID: "FFS2",
    FFS3_GUID: "FFS3",
    uuid.UUID(str(EfiSystemNvDataFvGuid)): "NV variable store",
}
_GUIDED_SECTION_NAMES = {
    LZMA_SECTION_GUID: "LZMA",
    LZMA_F86_SECTION_GUID: "LZMA+x86",
    TIANO_SECTION_GUID: "Tiano",
    BROTLI_SECTION_GUID: "Brotli",
    CRC32_SECTION_GUID: "CRC32",
}

# EFI_FIRMWARE_VOLUME_HEADER with one BlockMap entry and the terminating entry:
# the least a volume can carry, and what EfiFirmwareVolumeHeader reads.
FV_HEADER_SIZE = 72
FV_SIGNATURE_OFFSET = 40
FV_EXT_HEADER_SIZE = 20
EFI_FVB2_ERASE_POLARITY = 0x00000800

FFS_HEADER_SIZE = 24
FFS_HEADER2_SIZE = 32
FFS_ATTRIB_LARGE_FILE = 0x01
EFI_FILE_DATA_VALID = 0x04
EFI_FILE_MARKED_FOR_UPDATE = 0x08
EFI_FV_FILETYPE_SECURITY_CORE = 0x03
EFI_FV_FILETYPE_FFS_PAD = 0xF0
# File types whose contents are a series of sections (FREEFORM .. MM_CORE_STANDALONE).
_SECTIONED_FILE_TYPES = range(0x02, 0x10)

EFI_SECTION_COMPRESSION = 0x01
EFI_SECTION_GUID_DEFINED = 0x02
EFI_SECTION_PE32 = 0x10
EFI_SECTION_TE = 0x12
EFI_SECTION_USER_INTERFACE = 0x15
EFI_SECTION_FIRMWARE_VOLUME_IMAGE = 0x17
EFI_GUIDED_SECTION_PROCESSING_REQUIRED = 0x01
SECTION_EXTENDED_SIZE = 0xFFFFFF

TE_HEADER_SIZE = 40
TE_SIGNATURE = b"VZ"

#: QEMU maps an x86 flash image so that it ends at 4 GiB.
FLASH_TOP = 0x1_0000_0000

MAX_IMAGE_SIZE = 256 * 1024 * 1024
MAX_DECOMPRESSED_TOTAL = 128 * 1024 * 1024
MAX_NESTING = 8
BUILD_ID_SIZE = 16


# --- report ----------------------------------------------------------------


@dataclass(frozen=True)
class FirmwareVolumeInfo:
    """One firmware volume. ``offset`` is a file offset when ``in_flash``,
    else the offset inside the decoded section data that holds the volume."""

    index: int
    offset: int
    size: int
    file_system_guid: str
    file_system: str
    name_guid: str | None
    file_count: int | None  # None: not an FFS volume (e.g. the variable store)
    in_flash: bool
    parent: int | None  # index of the volume this one is nested in
    container_file: str | None  # GUID of the FFS file holding it
    encapsulation: str  # "flash", or the chain of sections around it


@dataclass(frozen=True)
class SecModuleInfo:
    file_guid: str
    is_ovmf_sec_main: bool
    volume: int  # index into ImageReport.firmware_volumes
    image_format: str  # "PE32" or "TE"
    image_base: int
    image_size: int
    flash_address: int | None  # where the image lies when the file is mapped below 4 GiB
    executes_in_place: bool | None  # image_base == flash_address


@dataclass(frozen=True)
class HelperInfo:
    record_rva: int
    info_size: int
    abi_major: int
    abi_minor: int
    abi_supported: bool  # the major version is the one this tool reads
    capabilities: int | None
    capability_names: tuple[str, ...]
    build_id: str | None
    build_id_address: int | None
    fw_cfg_names: tuple[str, ...]
    secret_page_base: int | None
    mailbox_min_base: int | None


@dataclass(frozen=True)
class ImageReport:
    path: str
    size: int
    firmware_volumes: tuple[FirmwareVolumeInfo, ...]
    sec: SecModuleInfo | None
    helper: HelperInfo | None
    tool_abi_major: int
    tool_abi_minor: int
    notes: tuple[str, ...] = field(default=())
    sev_launch: SevLaunchInfo | None = None  # None: the SEV table is corrupt (see notes)

    @property
    def sec_measured(self) -> bool | None:
        """Whether the SEC module (and so the helper) lies inside the flash
        range every SEV mode measures (the whole image, mapped to end at 4 GiB);
        None when there is no SEC module in flash or no SEV table."""
        if self.sec is None or self.sec.flash_address is None or not self.sev_launch:
            return None
        if not self.sev_launch.has_table:
            return None
        start = FOUR_GB - self.size
        return start <= self.sec.flash_address and self.sec.flash_address + self.sec.image_size <= FOUR_GB

    @property
    def sec_found(self) -> bool:
        return self.sec is not None

    @property
    def helper_present(self) -> bool:
        return self.helper is not None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; numbers stay numbers, GUIDs and the build id are strings."""
        return {
            "format": REPORT_FORMAT,
            "path": self.path,
            "size": self.size,
            "firmware_volumes": [asdict(fv) for fv in self.firmware_volumes],
            "sec_found": self.sec_found,
            "sec": asdict(self.sec) if self.sec else None,
            "helper_present": self.helper_present,
            "helper": _helper_json(self.helper) if self.helper else None,
            "tool_abi": {"major": self.tool_abi_major, "minor": self.tool_abi_minor},
            "notes": list(self.notes),
            "sev_launch": self.sev_launch.to_json() if self.sev_launch else None,
            "sec_in_measured_range": self.sec_measured,
        }


def _helper_json(helper: HelperInfo) -> dict[str, Any]:
    out = asdict(helper)
    out["capability_names"] = list(helper.capability_names)
    out["fw_cfg_names"] = list(helper.fw_cfg_names)
    return out


# --- bounds-checked reading ------------------------------------------------


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def _unpack(fmt: str, data: bytes, offset: int, what: str, limit: int | None = None) -> tuple[Any, ...]:
    """struct.unpack_from that reads nothing at or past ``limit`` (default: the end)."""
    size = struct.calcsize(fmt)
    end = len(data) if limit is None else min(limit, len(data))
    if offset < 0 or offset + size > end:
        raise ImageFormatError(
            f"{what} at offset {offset:#x} needs {size} bytes but its container ends at "
            f"{end:#x} (truncated or corrupt image)"
        )
    return struct.unpack_from(fmt, data, offset)


def _guid(data: bytes, offset: int, what: str, limit: int) -> uuid.UUID:
    (raw,) = _unpack("<16s", data, offset, what, limit)
    return uuid.UUID(bytes_le=bytes(raw))


@dataclass
class _SecCandidate:
    file_guid: uuid.UUID
    volume: int
    kind: int  # EFI_SECTION_PE32 or EFI_SECTION_TE
    data: bytes
    image_offset: int | None  # file offset of the section data, when in flash


@dataclass(frozen=True)
class Span:
    """Where one FFS file or section lies: ``buffer`` 0 is the image file,
    n > 0 the n-th decoded (LZMA) section payload, made by span ``source``."""

    buffer: int
    start: int
    end: int
    kind: str  # "file" or "section"
    type: int  # FFS file type or section type
    file_guid: uuid.UUID
    volume: int


@dataclass
class _Buffer:
    """Bytes being walked and where they sit in the image file (None when
    they come out of a decompressed section)."""

    data: bytes
    image_offset: int | None
    index: int = 0

    def file_offset(self, offset: int) -> int | None:
        return None if self.image_offset is None else self.image_offset + offset


class _Walker:
    def __init__(self) -> None:
        self.volumes: list[FirmwareVolumeInfo | None] = []
        self.sec: list[_SecCandidate] = []
        self.notes: list[str] = []
        self.decompressed = 0
        # Where every file and section lies, for tools that map an offset to
        # what holds it (host_shim/firmware/image_diff.py).
        self.spans: list[Span] = []
        self.buffers: list[bytes] = []
        self.buffer_source: dict[int, int] = {}  # buffer index -> span index
        self.ui_names: dict[uuid.UUID, str] = {}

    # -- firmware volumes --

    def scan_flash(self, data: bytes) -> None:
        self.buffers.append(data)
        buf = _Buffer(data, 0)
        pos = 0
        while True:
            hit = data.find(EFI_FVH_SIGNATURE, pos)
            if hit < 0:
                return
            start = hit - FV_SIGNATURE_OFFSET
            if start < 0 or start % 8:
                pos = hit + 1
                continue
            size = self.walk_volume(
                buf,
                start,
                len(data),
                parent=None,
                container_file=None,
                encapsulation="flash",
                depth=0,
            )
            pos = start + size

    def walk_volume(
        self,
        buf: _Buffer,
        start: int,
        limit: int,
        *,
        parent: int | None,
        container_file: uuid.UUID | None,
        encapsulation: str,
        depth: int,
    ) -> int:
        """Walk the volume at ``start``; it must end by ``limit``. Returns its length."""
        data = buf.data
        where = f"firmware volume at {self._where(buf, start)}"
        if depth > MAX_NESTING:
            raise ImageFormatError(f"{where}: firmware volumes nested too deep")
        if limit - start < FV_HEADER_SIZE:
            raise ImageFormatError(
                f"{where}: the header needs {FV_HEADER_SIZE} bytes but only {limit - start} remain (truncated image)"
            )
        signature = data[start + FV_SIGNATURE_OFFSET : start + FV_SIGNATURE_OFFSET + 4]
        if signature != EFI_FVH_SIGNATURE:
            raise ImageFormatError(f"{where}: no _FVH signature (corrupt volume)")
        header = EfiFirmwareVolumeHeader().load_from_file(io.BytesIO(data[start : start + FV_HEADER_SIZE]))
        fs_guid = uuid.UUID(str(header.FileSystemGuid))
        fv_length = int(header.FvLength)
        header_length = int(header.HeaderLength)
        attributes = int(header.Attributes)
        ext_offset = int(header.ExtHeaderOffset)
        if header_length < FV_HEADER_SIZE or header_length % 2 or header_length > fv_length:
            raise ImageFormatError(
                f"{where}: header length {header_length:#x} is invalid (volume length {fv_length:#x})"
            )
        if fv_length > limit - start:
            raise ImageFormatError(
                f"{where}: the header says the volume is {fv_length:#x} bytes but only "
                f"{limit - start:#x} remain (truncated image or corrupt FvLength)"
            )
        if start + header_length > len(data):
            raise ImageFormatError(f"{where}: header runs past the end of the data")
        words = struct.unpack_from(f"<{header_length // 2}H", data, start)
        if sum(words) & 0xFFFF:
            raise ImageFormatError(f"{where}: header checksum does not match (corrupt header)")

        end = start + fv_length
        name_guid: uuid.UUID | None = None
        first_file = header_length
        if ext_offset:
            if ext_offset < header_length or ext_offset + FV_EXT_HEADER_SIZE > fv_length:
                raise ImageFormatError(f"{where}: extended header offset {ext_offset:#x} is outside the volume")
            ext = EfiFirmwareVolumeExtHeader().load_from_file(
                io.BytesIO(data[start + ext_offset : start + ext_offset + FV_EXT_HEADER_SIZE])
            )
            ext_size = int(ext.ExtHeaderSize)
            if ext_size < FV_EXT_HEADER_SIZE or ext_offset + ext_size > fv_length:
                raise ImageFormatError(f"{where}: extended header size {ext_size:#x} runs past the volume")
            name_guid = uuid.UUID(bytes_le=bytes(ext.FileSystemGuid))
            first_file = ext_offset + ext_size
        first_file = _align(first_file, 8)

        index = len(self.volumes)
        self.volumes.append(None)  # keeps the parent ahead of nested volumes
        file_count: int | None = None
        if fs_guid in (FFS2_GUID, FFS3_GUID):
            erase_byte = 0xFF if attributes & EFI_FVB2_ERASE_POLARITY else 0x00
            file_count = self.walk_files(buf, start, start + first_file, end, erase_byte, index, depth)
        self.volumes[index] = FirmwareVolumeInfo(
            index=index,
            offset=start if buf.image_offset is None else buf.image_offset + start,
            size=fv_length,
            file_system_guid=str(fs_guid),
            file_system=_FILE_SYSTEM_NAMES.get(fs_guid, "unknown"),
            name_guid=str(name_guid) if name_guid else None,
            file_count=file_count,
            in_flash=buf.image_offset is not None,
            parent=parent,
            container_file=str(container_file) if container_file else None,
            encapsulation=encapsulation,
        )
        return fv_length

    @staticmethod
    def _where(buf: _Buffer, offset: int) -> str:
        file_offset = buf.file_offset(offset)
        if file_offset is not None:
            return f"file offset {file_offset:#x}"
        return f"offset {offset:#x} of decompressed data"

    # -- FFS files --

    def walk_files(
        self,
        buf: _Buffer,
        fv_start: int,
        first: int,
        end: int,
        erase_byte: int,
        volume: int,
        depth: int,
    ) -> int:
        data = buf.data
        count = 0
        offset = first
        free = bytes([erase_byte]) * FFS_HEADER_SIZE
        while offset + FFS_HEADER_SIZE <= end:
            if data[offset : offset + FFS_HEADER_SIZE] == free:
                break  # free space up to the end of the volume
            where = f"FFS file at {self._where(buf, offset)}"
            header = EfiFirmwareFileSystemHeader().load_from_file(io.BytesIO(data[offset : offset + FFS_HEADER_SIZE]))
            file_guid = uuid.UUID(str(header.FileSystemGuid))
            file_type = int(header.Type)
            attributes = int(header.Attributes)
            raw_state = int(header.State)
            header_size = FFS_HEADER_SIZE
            size = int(header.get_size())
            if attributes & FFS_ATTRIB_LARGE_FILE:
                header_size = FFS_HEADER2_SIZE
                (size,) = _unpack("<Q", data, offset + FFS_HEADER_SIZE, where, end)
            if size < header_size or size > end - offset:
                raise ImageFormatError(
                    f"{where}: file size {size:#x} does not fit in its volume ({end - offset:#x} bytes left)"
                )
            state = raw_state ^ erase_byte
            top_bit = 1 << (state.bit_length() - 1) if state else 0
            valid = top_bit in (EFI_FILE_DATA_VALID, EFI_FILE_MARKED_FOR_UPDATE)
            if valid and file_type != EFI_FV_FILETYPE_FFS_PAD:
                count += 1
                self.spans.append(Span(buf.index, offset, offset + size, "file", file_type, file_guid, volume))
                if file_type in _SECTIONED_FILE_TYPES:
                    self.walk_sections(
                        buf,
                        offset + header_size,
                        offset + size,
                        file_guid=file_guid,
                        file_type=file_type,
                        volume=volume,
                        chain=(),
                        depth=depth,
                    )
            offset = fv_start + _align(offset + size - fv_start, 8)
        return count

    # -- sections --

    def walk_sections(
        self,
        buf: _Buffer,
        start: int,
        end: int,
        *,
        file_guid: uuid.UUID,
        file_type: int,
        volume: int,
        chain: tuple[str, ...],
        depth: int,
    ) -> None:
        if depth > MAX_NESTING:
            raise ImageFormatError(
                f"sections at {self._where(buf, start)} (file {file_guid}) are nested more than {MAX_NESTING} deep"
            )
        data = buf.data
        offset = start
        while end - offset >= 4:
            where = f"section at {self._where(buf, offset)} (file {file_guid})"
            size_lo, size_hi, section_type = _unpack("<HBB", data, offset, where)
            size = size_lo | size_hi << 16
            header_size = 4
            if size == SECTION_EXTENDED_SIZE:
                header_size = 8
                (size,) = _unpack("<I", data, offset + 4, where, end)
            if size < header_size or size > end - offset:
                raise ImageFormatError(
                    f"{where}: section size {size:#x} does not fit in its file ({end - offset:#x} bytes left)"
                )
            body, body_end = offset + header_size, offset + size
            self.spans.append(Span(buf.index, offset, body_end, "section", section_type, file_guid, volume))
            if section_type == EFI_SECTION_USER_INTERFACE:
                raw_name = data[body:body_end].decode("utf-16-le", errors="replace")
                self.ui_names[file_guid] = raw_name.split("\0", 1)[0]
            if section_type == EFI_SECTION_FIRMWARE_VOLUME_IMAGE:
                self.walk_volume(
                    buf,
                    body,
                    body_end,
                    parent=volume,
                    container_file=file_guid,
                    encapsulation=" > ".join((*chain, "FV image section")),
                    depth=depth + 1,
                )
            elif section_type in (EFI_SECTION_PE32, EFI_SECTION_TE):
                if file_type == EFI_FV_FILETYPE_SECURITY_CORE:
                    self.sec.append(
                        _SecCandidate(
                            file_guid,
                            volume,
                            section_type,
                            data[body:body_end],
                            buf.file_offset(body),
                        )
                    )
            elif section_type == EFI_SECTION_COMPRESSION:
                self._compression_section(buf, body, body_end, where, file_guid, file_type, volume, chain, depth)
            elif section_type == EFI_SECTION_GUID_DEFINED:
                self._guided_section(
                    buf,
                    offset,
                    header_size,
                    body_end,
                    where,
                    file_guid,
                    file_type,
                    volume,
                    chain,
                    depth,
                )
            offset = start + _align(offset + size - start, 4)

    def _compression_section(
        self,
        buf: _Buffer,
        body: int,
        body_end: int,
        where: str,
        file_guid: uuid.UUID,
        file_type: int,
        volume: int,
        chain: tuple[str, ...],
        depth: int,
    ) -> None:
        _length, compression = _unpack("<IB", buf.data, body, where, body_end)
        if compression == 0:  # EFI_NOT_COMPRESSED
            self.walk_sections(
                buf,
                body + 5,
                body_end,
                file_guid=file_guid,
                file_type=file_type,
                volume=volume,
                chain=(*chain, "compression section (none)"),
                depth=depth,
            )
        else:
            self.notes.append(
                f"{where}: EFI-compressed section (type {compression}) not decoded; its contents were not inspected"
            )

    def _guided_section(
        self,
        buf: _Buffer,
        offset: int,
        header_size: int,
        end: int,
        where: str,
        file_guid: uuid.UUID,
        file_type: int,
        volume: int,
        chain: tuple[str, ...],
        depth: int,
    ) -> None:
        data = buf.data
        guid = _guid(data, offset + header_size, where, end)
        data_offset, attributes = _unpack("<HH", data, offset + header_size + 16, where, end)
        if data_offset < header_size + 20 or data_offset > end - offset:
            raise ImageFormatError(f"{where}: GUID-defined section data offset {data_offset:#x} is invalid")
        payload_start = offset + data_offset
        name = _GUIDED_SECTION_NAMES.get(guid, str(guid))
        if guid == LZMA_SECTION_GUID:
            inner = self._lzma(data[payload_start:end], where)
            self.buffer_source[len(self.buffers)] = len(self.spans) - 1
            self.buffers.append(inner)
            self.walk_sections(
                _Buffer(inner, None, len(self.buffers) - 1),
                0,
                len(inner),
                file_guid=file_guid,
                file_type=file_type,
                volume=volume,
                chain=(*chain, f"{name} section"),
                depth=depth + 1,
            )
        elif not attributes & EFI_GUIDED_SECTION_PROCESSING_REQUIRED:
            self.walk_sections(
                buf,
                payload_start,
                end,
                file_guid=file_guid,
                file_type=file_type,
                volume=volume,
                chain=(*chain, f"{name} section"),
                depth=depth + 1,
            )
        else:
            self.notes.append(
                f"{where}: {name} GUID-defined section ({guid}) not decoded; its contents were not inspected"
            )

    def _lzma(self, payload: bytes, where: str) -> bytes:
        """Decode an EDK2 LZMA section: a 13-byte LZMA 'alone' header
        (properties, dictionary size, 64-bit uncompressed size), then the stream."""
        if len(payload) < 13:
            raise ImageFormatError(f"{where}: LZMA section is shorter than its header")
        (declared,) = struct.unpack_from("<Q", payload, 5)
        budget = MAX_DECOMPRESSED_TOTAL - self.decompressed
        if declared > budget:
            raise ImageFormatError(
                f"{where}: LZMA section claims {declared:#x} decompressed bytes, more than "
                f"this tool accepts ({budget:#x} left of {MAX_DECOMPRESSED_TOTAL:#x})"
            )
        decoder = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=MAX_DECOMPRESSED_TOTAL)
        try:
            out = decoder.decompress(payload, max_length=declared + 1)
        except lzma.LZMAError as exc:
            raise ImageFormatError(f"{where}: LZMA data is corrupt ({exc})") from exc
        if len(out) != declared:
            raise ImageFormatError(
                f"{where}: LZMA section decoded to {len(out):#x} bytes, header says "
                f"{declared:#x} (truncated or corrupt)"
            )
        self.decompressed += len(out)
        return out


# --- SEC image and helper record ---------------------------------------------


@dataclass(frozen=True)
class _MappedImage:
    """A PE32 or TE image as stored in its section, with RVA -> data offset."""

    data: bytes
    kind: str
    image_base: int
    image_size: int
    pe: Any  # pefile.PE for PE32, None for TE
    te_delta: int  # for TE: data offset = rva - te_delta

    def read_rva(self, rva: int, length: int) -> bytes | None:
        if rva < 0 or rva + length > self.image_size:
            return None
        if self.pe is not None:
            try:
                offset = int(self.pe.get_offset_from_rva(rva))
            except pefile.PEFormatError:
                return None
        else:
            offset = rva - self.te_delta
        if offset < 0 or offset + length > len(self.data):
            return None
        return self.data[offset : offset + length]

    def rva_of_offset(self, offset: int) -> int:
        if self.pe is not None:
            rva = self.pe.get_rva_from_offset(offset)
            return int(rva) if rva is not None else offset
        return offset + self.te_delta


def _map_sec_image(candidate: _SecCandidate) -> _MappedImage:
    data = candidate.data
    what = f"SEC module {candidate.file_guid}"
    if candidate.kind == EFI_SECTION_TE:
        signature, _machine, _sections, _subsystem, stripped = _unpack("<2sHBBH", data, 0, f"{what} TE header")
        (image_base,) = _unpack("<Q", data, 16, f"{what} TE header")
        if signature != TE_SIGNATURE:
            raise ImageFormatError(f"{what}: TE section does not start with 'VZ'")
        if stripped < TE_HEADER_SIZE:
            raise ImageFormatError(f"{what}: TE StrippedSize {stripped:#x} is invalid")
        delta = stripped - TE_HEADER_SIZE
        return _MappedImage(data, "TE", int(image_base), len(data) + delta, None, delta)
    try:
        pe = pefile.PE(data=data, fast_load=True)
        image_base = int(pe.OPTIONAL_HEADER.ImageBase)
        image_size = int(pe.OPTIONAL_HEADER.SizeOfImage)
    except Exception as exc:  # pefile raises assorted errors on hostile input
        raise ImageFormatError(f"{what}: PE32 image is malformed ({exc})") from exc
    return _MappedImage(data, "PE32", image_base, image_size, pe, 0)


def _field(layout: abi_module.Layout, name: str, data: bytes, base: int, what: str) -> Any:
    f = layout.field(name)
    values = _unpack("<" + f.struct_format, data, base + f.offset, f"{what} field {name}")
    return values[0] if len(values) == 1 else values


def _capability_names(a: abi_module.Abi, capabilities: int) -> tuple[str, ...]:
    known = a.names_with_prefix("OVMF_MH_CAP_")
    names: list[str] = []
    for bit in range(64):
        mask = 1 << bit
        if capabilities & mask:
            names.append(known.get(mask, f"UNKNOWN_BIT_{bit}"))
    return tuple(names)


def _read_helper(image: _MappedImage, notes: list[str]) -> HelperInfo | None:
    a = abi_module.load()
    layout = a.layout("OVMF_MH_IMAGE_INFO")
    signature_end = layout.offset("InfoSize")
    needle = layout.pack(
        SignatureLow=a.const("OVMF_MH_IMAGE_INFO_SIGNATURE_LOW"),
        SignatureHigh=a.const("OVMF_MH_IMAGE_INFO_SIGNATURE_HIGH"),
    )[:signature_end]
    data = image.data
    hits: list[int] = []
    pos = data.find(needle)
    while pos >= 0:
        hits.append(pos)
        pos = data.find(needle, pos + 1)
    if not hits:
        return None
    if len(hits) > 1:
        notes.append(
            f"{len(hits)} OVMF_MH_IMAGE_INFO signatures in the SEC image; reading the first at data offset {hits[0]:#x}"
        )
    base = hits[0]
    what = f"OVMF_MH_IMAGE_INFO at SEC image data offset {base:#x}"
    # The signature, InfoSize and the ABI version keep their place across
    # major versions; the rest is read only for the major this tool knows.
    info_size = int(_field(layout, "InfoSize", data, base, what))
    abi_major = int(_field(layout, "AbiMajor", data, base, what))
    abi_minor = int(_field(layout, "AbiMinor", data, base, what))
    record_rva = image.rva_of_offset(base)
    if abi_major != a.const("OVMF_MH_ABI_MAJOR"):
        notes.append(
            f"helper ABI {abi_major}.{abi_minor} is not readable by this tool "
            f"(ABI {a.const('OVMF_MH_ABI_MAJOR')}.x); only its version was decoded"
        )
        return HelperInfo(
            record_rva,
            info_size,
            abi_major,
            abi_minor,
            False,
            None,
            (),
            None,
            None,
            (),
            None,
            None,
        )
    if abi_minor > a.const("OVMF_MH_ABI_MINOR"):
        notes.append(
            f"helper ABI {abi_major}.{abi_minor} is newer than this tool's "
            f"{abi_major}.{a.const('OVMF_MH_ABI_MINOR')}; what was added since is not shown"
        )
    if info_size < layout.size:
        raise ImageFormatError(
            f"{what}: InfoSize {info_size} is smaller than the {layout.size} bytes of "
            f"ABI {abi_major}.x (corrupt record)"
        )
    if base + layout.size > len(data):
        raise ImageFormatError(f"{what}: record is cut off by the end of the SEC image")
    record = layout.unpack(data[base : base + layout.size])

    raw_name = bytes(record["RequestFwCfgName"])
    nul = raw_name.find(b"\0")
    if nul <= 0:
        raise ImageFormatError(f"{what}: RequestFwCfgName is empty or not NUL-terminated")
    try:
        fw_cfg_name = raw_name[:nul].decode("ascii")
    except UnicodeDecodeError as exc:
        raise ImageFormatError(f"{what}: RequestFwCfgName is not ASCII") from exc
    if not fw_cfg_name.isprintable():
        raise ImageFormatError(f"{what}: RequestFwCfgName has control characters")

    build_id_address = int(record["BuildIdAddress"])
    rva = build_id_address - image.image_base
    raw_id = image.read_rva(rva, BUILD_ID_SIZE)
    if raw_id is None:
        raise ImageFormatError(
            f"{what}: BuildIdAddress {build_id_address:#x} is not inside the SEC image "
            f"(ImageBase {image.image_base:#x}, SizeOfImage {image.image_size:#x})"
        )
    capabilities = int(record["Capabilities"])
    return HelperInfo(
        record_rva=record_rva,
        info_size=info_size,
        abi_major=abi_major,
        abi_minor=abi_minor,
        abi_supported=True,
        capabilities=capabilities,
        capability_names=_capability_names(a, capabilities),
        build_id=raw_id.hex(),
        build_id_address=build_id_address,
        fw_cfg_names=(fw_cfg_name,),
        secret_page_base=int(record["SecretPageBase"]),
        mailbox_min_base=int(record["MailboxMinBase"]),
    )


# --- entry point -------------------------------------------------------------


def _read_file(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ImageFormatError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ImageFormatError(f"{path}: cannot access ({exc.strerror})") from exc
    if path.is_dir():
        raise ImageFormatError(f"{path}: is a directory, not a firmware image")
    if not path.is_file():
        raise ImageFormatError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise ImageFormatError(f"{path}: empty file, not a firmware image")
    if st.st_size > MAX_IMAGE_SIZE:
        raise ImageFormatError(f"{path}: {st.st_size} bytes is too large for a flash image (limit {MAX_IMAGE_SIZE})")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageFormatError(f"{path}: cannot read ({exc.strerror})") from exc


def inspect_image(path: Path) -> ImageReport:
    """Inspect a firmware image file; raise ImageFormatError if it is not one."""
    return inspect_bytes(_read_file(path), str(path))


def inspect_bytes(data: bytes, source: str = "<bytes>") -> ImageReport:
    """Inspect an image already in memory; ``source`` names it in the report
    and in error messages."""
    if not data:
        raise ImageFormatError(f"{source}: empty, not a firmware image")
    try:
        return _inspect_data(data, source)
    except ImageFormatError as exc:
        raise ImageFormatError(f"{source}: {exc}") from exc


def _inspect_data(data: bytes, source: str) -> ImageReport:
    walker = _Walker()
    walker.scan_flash(data)
    if not walker.volumes:
        raise ImageFormatError(f"not a firmware image: no firmware volume header (_FVH) found in {len(data)} bytes")
    notes = walker.notes
    a = abi_module.load()
    sec: SecModuleInfo | None = None
    helper: HelperInfo | None = None
    if walker.sec:
        if len(walker.sec) > 1:
            notes.append(
                f"{len(walker.sec)} SEC core images found; inspecting the first (file {walker.sec[0].file_guid})"
            )
        candidate = walker.sec[0]
        image = _map_sec_image(candidate)
        flash_address = None
        if candidate.image_offset is not None and len(data) <= FLASH_TOP:
            flash_address = FLASH_TOP - len(data) + candidate.image_offset
        sec = SecModuleInfo(
            file_guid=str(candidate.file_guid),
            is_ovmf_sec_main=candidate.file_guid == SEC_MAIN_FILE_GUID,
            volume=candidate.volume,
            image_format=image.kind,
            image_base=image.image_base,
            image_size=image.image_size,
            flash_address=flash_address,
            executes_in_place=None if flash_address is None else flash_address == image.image_base,
        )
        if sec.executes_in_place is False:
            notes.append(
                f"SEC ImageBase {image.image_base:#x} is not where the image lies when the "
                f"file is mapped below 4 GiB ({flash_address:#x})"
            )
        helper = _read_helper(image, notes)
    sev_launch: SevLaunchInfo | None = None
    try:
        sev_launch = read_sev_launch_info(data)
    except SevMetadataError as exc:
        notes.append(f"SEV metadata is corrupt: {exc}")
    return ImageReport(
        path=source,
        size=len(data),
        firmware_volumes=tuple(fv for fv in walker.volumes if fv is not None),
        sec=sec,
        helper=helper,
        tool_abi_major=a.const("OVMF_MH_ABI_MAJOR"),
        tool_abi_minor=a.const("OVMF_MH_ABI_MINOR"),
        notes=tuple(notes),
        sev_launch=sev_launch,
    )


@dataclass(frozen=True)
class Layout:
    """Every FFS file and section of an image and the decoded payloads they
    hold, in walk order (see :class:`Span`)."""

    spans: tuple[Span, ...]
    buffers: tuple[bytes, ...]
    buffer_source: dict[int, int]
    ui_names: dict[uuid.UUID, str]
    volumes: tuple[FirmwareVolumeInfo, ...]


def image_layout(data: bytes, source: str = "<bytes>") -> Layout:
    """Walk an image as :func:`inspect_bytes` does and return where each file
    and section lies; raise ImageFormatError if it is not a firmware image."""
    walker = _Walker()
    try:
        walker.scan_flash(data)
    except ImageFormatError as exc:
        raise ImageFormatError(f"{source}: {exc}") from exc
    if not walker.volumes:
        raise ImageFormatError(f"{source}: not a firmware image: no firmware volume header (_FVH) found")
    return Layout(
        spans=tuple(walker.spans),
        buffers=tuple(walker.buffers),
        buffer_source=dict(walker.buffer_source),
        ui_names=dict(walker.ui_names),
        volumes=tuple(fv for fv in walker.volumes if fv is not None),
    )
