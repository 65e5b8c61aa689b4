"""An independent computation of AMD SEV launch digests, to check
``ovmf-mh measure`` (which uses the sev-snp-measure package) against.

Nothing here comes from sev-snp-measure; it is written from:

- AMD SEV API spec (LAUNCH_UPDATE_DATA / LAUNCH_UPDATE_VMSA / LAUNCH_MEASURE):
  the SEV and SEV-ES digest is SHA-256 over the bytes passed in, in order;
- AMD SEV-SNP ABI spec, SNP_LAUNCH_UPDATE: each page extends the digest as
  SHA-384(PAGE_INFO), PAGE_INFO = DIGEST_CUR(48) | CONTENTS(48) | LENGTH(2,
  0x70) | PAGE_TYPE(1) | IMI_PAGE(1) | VMPL3/2/1_PERMS(3) | reserved(1) |
  GPA(8); CONTENTS is SHA-384 of the page for NORMAL and VMSA pages, zero for
  the other types;
- AMD APM volume 2, appendix B (VMSA layout: segment registers at 0x0..0x90,
  EFER 0xD0, CR4 0x148, CR0 0x158, DR7 0x160, DR6 0x168, RFLAGS 0x170,
  RIP 0x178, G_PAT 0x268, RDX 0x310, SEV_FEATURES 0x3B0, XCR0 0x3E8,
  MXCSR 0x408, X87 FCW 0x410);
- the x86 reset state QEMU gives a vCPU (CS F000:FFF0 with base FFFF0000,
  data segments 0x93, LDTR 0x82, TR 0x8B, descriptor-table limits FFFF,
  RDX = CPUID signature, DR6/DR7/RFLAGS reset values), KVM's additions for an
  encrypted guest (EFER.SVME, CR4.MCE, the reset PAT, XCR0 = 1, the FPU
  control words), and QEMU's SEV-ES AP start (CS base and IP taken from the
  SEV-ES reset block); KVM maps every VMSA at GPA 0xFFFFFFFFF000 for SNP.

The OVMF table is read with host_shim.firmware.sev_metadata, our own reader.
"""

from __future__ import annotations

import hashlib
import struct

from host_shim.firmware.sev_metadata import FOUR_GB, read_sev_launch_info

PAGE = 4096
VMSA_GPA = 0xFFFF_FFFF_F000

# SNP page types
PAGE_NORMAL, PAGE_VMSA, PAGE_ZERO, PAGE_UNMEASURED, PAGE_SECRETS, PAGE_CPUID = 1, 2, 3, 4, 5, 6
_SECTION_PAGE_TYPE = {1: PAGE_ZERO, 2: PAGE_SECRETS, 3: PAGE_CPUID, 4: PAGE_ZERO}


def _segment(selector: int, attrib: int, limit: int, base: int) -> bytes:
    return struct.pack("<HHIQ", selector, attrib, limit, base)


def vmsa_page(rip: int, cs_base: int, vcpu_sig: int, sev_features: int) -> bytes:
    page = bytearray(PAGE)

    def put(offset: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, page, offset, value)

    data_segment = _segment(0, 0x93, 0xFFFF, 0)
    for offset in (0x00, 0x20, 0x30, 0x40, 0x50):  # ES, SS, DS, FS, GS
        page[offset : offset + 16] = data_segment
    page[0x10:0x20] = _segment(0xF000, 0x9B, 0xFFFF, cs_base)  # CS
    page[0x60:0x70] = _segment(0, 0, 0xFFFF, 0)  # GDTR
    page[0x70:0x80] = _segment(0, 0x82, 0xFFFF, 0)  # LDTR
    page[0x80:0x90] = _segment(0, 0, 0xFFFF, 0)  # IDTR
    page[0x90:0xA0] = _segment(0, 0x8B, 0xFFFF, 0)  # TR
    put(0xD0, "<Q", 0x1000)  # EFER.SVME
    put(0x148, "<Q", 0x40)  # CR4.MCE
    put(0x158, "<Q", 0x10)  # CR0.ET
    put(0x160, "<Q", 0x400)  # DR7
    put(0x168, "<Q", 0xFFFF0FF0)  # DR6
    put(0x170, "<Q", 0x2)  # RFLAGS
    put(0x178, "<Q", rip)
    put(0x268, "<Q", 0x0007040600070406)  # G_PAT
    put(0x310, "<Q", vcpu_sig)  # RDX
    put(0x3B0, "<Q", sev_features)
    put(0x3E8, "<Q", 0x1)  # XCR0
    put(0x408, "<I", 0x1F80)  # MXCSR
    put(0x410, "<H", 0x037F)  # X87 FCW
    return bytes(page)


def vmsa_pages(ap_reset_ip: int, vcpus: int, vcpu_sig: int, sev_features: int) -> list[bytes]:
    bsp = vmsa_page(0xFFF0, 0xFFFF0000, vcpu_sig, sev_features)
    ap = vmsa_page(ap_reset_ip & 0xFFFF, ap_reset_ip & 0xFFFF0000, vcpu_sig, sev_features)
    return [bsp] + [ap] * (vcpus - 1)


def sev_digest(image: bytes) -> bytes:
    return hashlib.sha256(image).digest()


def seves_digest(image: bytes, vcpus: int, vcpu_sig: int) -> bytes:
    info = read_sev_launch_info(image)
    assert info.sev_es_ap_reset_ip is not None
    digest = hashlib.sha256(image)
    for page in vmsa_pages(info.sev_es_ap_reset_ip, vcpus, vcpu_sig, 0):
        digest.update(page)
    return digest.digest()


class _SnpChain:
    def __init__(self) -> None:
        self.digest = bytes(48)

    def update(self, page_type: int, gpa: int, contents: bytes) -> None:
        page_info = self.digest + contents + struct.pack("<HBBBBBBQ", 0x70, page_type, 0, 0, 0, 0, 0, gpa)
        assert len(page_info) == 0x70
        self.digest = hashlib.sha384(page_info).digest()

    def page(self, page_type: int, gpa: int, data: bytes | None = None) -> None:
        self.update(page_type, gpa, hashlib.sha384(data).digest() if data is not None else bytes(48))


def snp_digest(image: bytes, vcpus: int, vcpu_sig: int, guest_features: int) -> bytes:
    info = read_sev_launch_info(image)
    assert info.sev_es_ap_reset_ip is not None and info.sections
    chain = _SnpChain()
    base = FOUR_GB - len(image)
    for offset in range(0, len(image), PAGE):
        chain.page(PAGE_NORMAL, base + offset, image[offset : offset + PAGE])
    for section in info.sections:
        page_type = _SECTION_PAGE_TYPE[section.type]
        for offset in range(0, section.size, PAGE):
            chain.page(page_type, section.gpa + offset)
    for vmsa in vmsa_pages(info.sev_es_ap_reset_ip, vcpus, vcpu_sig, guest_features):
        chain.page(PAGE_VMSA, VMSA_GPA, vmsa)
    return chain.digest
