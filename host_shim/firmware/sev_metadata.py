"""What an AMD SEV launch measurement of an OVMF image depends on, read from
the image: the GUIDed table at the end of the reset vector and the SEV
metadata it points to.

OVMF's reset vector (OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm) ends
32 bytes before the end of the flash with a table of entries, read backwards
from its footer: each entry is its data, a UINT16 length (data + 18) and a
GUID. The entries a VMM and a guest owner use:

- SEV-ES reset block: the AP reset address (UINT32) the VMM puts into every
  AP's VMSA under SEV-ES and SNP (measured with the VMSAs);
- SEV hash table block: base and size of the page where QEMU puts the
  hashes of -kernel/-initrd/-append (zero in OvmfPkgX64: no measured
  direct boot);
- SEV secret block: base and size of OVMF's LAUNCH_SECRET page (zero in
  OvmfPkgX64);
- OVMF SEV metadata: offset from the end of the image of an 'ASEV' header
  followed by (GPA, size, type) sections the VMM must pre-validate or fill
  before an SNP launch (zero pages, the SNP secrets page, the CPUID page,
  the kernel-hashes page).

The layout here is read from the EDK2 sources named above; sev-snp-measure
reads the same table, independently.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from host_shim.errors import SevMetadataError

FOUR_GB = 0x1_0000_0000
#: The table ends this far before the end of the image (reset vector, VTF0).
TABLE_END_FROM_IMAGE_END = 32
ENTRY_HEADER_SIZE = 18  # UINT16 length + GUID

FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_ES_RESET_BLOCK_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_HASH_TABLE_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
SEV_SECRET_BLOCK_GUID = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
SEV_METADATA_GUID = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
TDX_METADATA_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")

ENTRY_NAMES = {
    SEV_ES_RESET_BLOCK_GUID: "SEV-ES reset block",
    SEV_HASH_TABLE_GUID: "SEV hash table block (kernel hashes)",
    SEV_SECRET_BLOCK_GUID: "SEV secret block (LAUNCH_SECRET)",
    SEV_METADATA_GUID: "OVMF SEV metadata (SNP sections)",
    TDX_METADATA_GUID: "TDX metadata",
}

METADATA_SIGNATURE = b"ASEV"
METADATA_HEADER_SIZE = 16
METADATA_SECTION_SIZE = 12

SECTION_TYPES = {
    1: "SNP_SEC_MEM",
    2: "SNP_SECRETS",
    3: "CPUID",
    4: "SVSM_CAA",
    0x10: "SNP_KERNEL_HASHES",
}
#: How QEMU feeds each section type into an SNP launch.
SECTION_MEASUREMENT = {
    1: "zero pages (SNP_PAGE_TYPE_ZERO: measured as zero)",
    2: "SNP secrets page (filled by the secure processor; measured by type only)",
    3: "CPUID page (checked by the secure processor; measured by type only)",
    4: "zero pages (SVSM calling area)",
    0x10: "kernel hashes page (measured contents)",
}
SNP_KERNEL_HASHES = 0x10


@dataclass(frozen=True)
class MetadataSection:
    gpa: int
    size: int
    type: int

    @property
    def type_name(self) -> str:
        return SECTION_TYPES.get(self.type, f"UNKNOWN_{self.type:#x}")


@dataclass(frozen=True)
class SevLaunchInfo:
    """The measured-launch facts of one image (all addresses are guest
    physical addresses; the image is mapped to end at 4 GiB)."""

    image_size: int
    table: dict[str, bytes]  # entry GUID -> entry data
    sev_es_ap_reset_ip: int | None
    hash_table: tuple[int, int] | None  # (base, size) of the kernel-hashes page
    secret_block: tuple[int, int] | None  # (base, size) of OVMF's launch-secret page
    metadata_offset: int | None  # file offset of the 'ASEV' header
    sections: tuple[MetadataSection, ...]

    @property
    def has_table(self) -> bool:
        return bool(self.table)

    @property
    def image_gpa(self) -> int:
        return FOUR_GB - self.image_size

    @property
    def kernel_hashes_sev(self) -> bool:
        """SEV/SEV-ES can measure -kernel/-initrd/-append (hash table base non-zero)."""
        return self.hash_table is not None and self.hash_table[0] != 0

    @property
    def kernel_hashes_snp(self) -> bool:
        """SNP can measure them: the hash table and an SNP_KERNEL_HASHES section."""
        return self.kernel_hashes_sev and any(s.type == SNP_KERNEL_HASHES for s in self.sections)

    def to_json(self) -> dict[str, Any]:
        return {
            "table_entries": {guid: ENTRY_NAMES.get(uuid.UUID(guid), "unknown") for guid in self.table},
            "sev_es_ap_reset_ip": self.sev_es_ap_reset_ip,
            "hash_table": list(self.hash_table) if self.hash_table else None,
            "secret_block": list(self.secret_block) if self.secret_block else None,
            "metadata_offset": self.metadata_offset,
            "snp_sections": [asdict(s) | {"type_name": s.type_name} for s in self.sections],
            "kernel_hashes_sev": self.kernel_hashes_sev,
            "kernel_hashes_snp": self.kernel_hashes_snp,
            "measured_range": [self.image_gpa, FOUR_GB],
        }


def _parse_table(data: bytes) -> dict[str, bytes]:
    end = len(data) - TABLE_END_FROM_IMAGE_END
    if end - ENTRY_HEADER_SIZE < 0:
        return {}
    size, raw_guid = struct.unpack_from("<H16s", data, end - ENTRY_HEADER_SIZE)
    if uuid.UUID(bytes_le=raw_guid) != FOOTER_GUID:
        return {}
    start = end - size
    if size < ENTRY_HEADER_SIZE or start < 0:
        raise SevMetadataError(f"OVMF table footer says {size} bytes, which does not fit the image")
    table: dict[str, bytes] = {}
    pos = end - ENTRY_HEADER_SIZE  # entries end where the footer starts
    while pos > start:
        if pos - ENTRY_HEADER_SIZE < start:
            raise SevMetadataError(f"OVMF table entry header at file offset {pos - ENTRY_HEADER_SIZE:#x} is cut off")
        length, raw = struct.unpack_from("<H16s", data, pos - ENTRY_HEADER_SIZE)
        if length < ENTRY_HEADER_SIZE or pos - length < start:
            raise SevMetadataError(
                f"OVMF table entry {uuid.UUID(bytes_le=raw)} at file offset {pos - ENTRY_HEADER_SIZE:#x} "
                f"has invalid length {length}"
            )
        table[str(uuid.UUID(bytes_le=raw))] = data[pos - length : pos - ENTRY_HEADER_SIZE]
        pos -= length
    return table


def _u32_pair(entry: bytes | None, what: str) -> tuple[int, int] | None:
    if entry is None:
        return None
    if len(entry) < 8:
        raise SevMetadataError(f"{what} entry has {len(entry)} bytes, expected 8")
    base, size = struct.unpack_from("<II", entry)
    return int(base), int(size)


def _parse_sections(data: bytes, entry: bytes) -> tuple[int, tuple[MetadataSection, ...]]:
    if len(entry) < 4:
        raise SevMetadataError(f"SEV metadata entry has {len(entry)} bytes, expected 4")
    (from_end,) = struct.unpack_from("<I", entry)
    offset = len(data) - from_end
    if from_end == 0 or offset < 0 or offset + METADATA_HEADER_SIZE > len(data):
        raise SevMetadataError(f"SEV metadata offset {from_end:#x} from the end is outside the image")
    signature, length, version, count = struct.unpack_from("<4sIII", data, offset)
    if signature != METADATA_SIGNATURE:
        raise SevMetadataError(f"SEV metadata at file offset {offset:#x} has signature {signature!r}, not 'ASEV'")
    if version != 1:
        raise SevMetadataError(f"SEV metadata version {version} is not 1")
    if length != METADATA_HEADER_SIZE + count * METADATA_SECTION_SIZE or offset + length > len(data):
        raise SevMetadataError(f"SEV metadata length {length} does not match its {count} sections")
    sections = tuple(
        MetadataSection(*struct.unpack_from("<III", data, offset + METADATA_HEADER_SIZE + i * METADATA_SECTION_SIZE))
        for i in range(count)
    )
    return offset, sections


def read_sev_launch_info(data: bytes) -> SevLaunchInfo:
    """Parse the reset vector's GUIDed table and the SEV metadata. An image
    without the table gives an empty SevLaunchInfo; a corrupt table raises
    SevMetadataError."""
    table = _parse_table(data)
    reset = table.get(str(SEV_ES_RESET_BLOCK_GUID))
    if reset is not None and len(reset) < 4:
        raise SevMetadataError(f"SEV-ES reset block entry has {len(reset)} bytes, expected 4")
    metadata = table.get(str(SEV_METADATA_GUID))
    offset, sections = _parse_sections(data, metadata) if metadata is not None else (None, ())
    return SevLaunchInfo(
        image_size=len(data),
        table=table,
        sev_es_ap_reset_ip=struct.unpack_from("<I", reset)[0] if reset is not None else None,
        hash_table=_u32_pair(table.get(str(SEV_HASH_TABLE_GUID)), "SEV hash table"),
        secret_block=_u32_pair(table.get(str(SEV_SECRET_BLOCK_GUID)), "SEV secret block"),
        metadata_offset=offset,
        sections=sections,
    )
