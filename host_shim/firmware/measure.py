"""The launch digest an AMD secure processor will report for an OVMF image.

The digest itself is computed by ``sev-snp-measure`` (PyPI), the library made
for it. This module checks first, with its own readers, that the file is a
firmware image (:mod:`host_shim.firmware.inspect_image`) and that it carries what the
chosen mode needs (:mod:`host_shim.firmware.sev_metadata`), so that a file the VMM
would refuse to launch gets a clear error instead of a digest:

- sev:   the whole flash is hashed (SHA-256); the image must be a firmware
         image with OVMF's reset-vector table;
- seves: the flash, then one VMSA per vCPU (SHA-256); needs the SEV-ES reset
         block (the APs' reset address);
- snp:   SNP_LAUNCH_UPDATE of the flash pages, then the metadata sections,
         then the VMSAs (SHA-384 chain); needs the SEV metadata sections.

With --kernel, the image must have a kernel-hashes page (SEV hash table with
a non-zero base; for SNP also an SNP_KERNEL_HASHES section).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sevsnpmeasure import guest as snp_guest
from sevsnpmeasure import vcpu_types
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vmm_types import VMMType

from host_shim.errors import OvmfMhError, SevMetadataError
from host_shim.firmware.inspect_image import inspect_image
from host_shim.firmware.sev_metadata import SevLaunchInfo, read_sev_launch_info

MEASURE_FORMAT = "ovmf-mh-measure/1"
DEFAULT_VCPU_TYPE = "EPYC-v4"
#: SNP guest features (VMSA SEV_FEATURES) QEMU sets by default: SNPActive.
DEFAULT_GUEST_FEATURES = 0x1
VCPU_TYPES: tuple[str, ...] = tuple(vcpu_types.CPU_SIGS)


class Mode(enum.Enum):
    SEV = "sev"
    SEV_ES = "seves"
    SNP = "snp"

    @property
    def title(self) -> str:
        return {"sev": "SEV", "seves": "SEV-ES", "snp": "SEV-SNP"}[self.value]

    @property
    def algorithm(self) -> str:
        return "SHA-384" if self is Mode.SNP else "SHA-256"


class MeasureError(OvmfMhError):
    """Arguments that cannot describe a launch (vCPU count, kernel without initrd...)."""

    exit_code = 2


@dataclass(frozen=True)
class Measurement:
    image: Path
    image_sha256: str
    mode: Mode
    digest: bytes
    vcpus: int
    vcpu_type: str | None
    vcpu_sig: int
    guest_features: int | None
    kernel: Path | None
    initrd: Path | None
    append: str | None
    launch: SevLaunchInfo

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MEASURE_FORMAT,
            "image": str(self.image),
            "image_sha256": self.image_sha256,
            "mode": self.mode.value,
            "algorithm": self.mode.algorithm,
            "digest": self.digest.hex(),
            "vcpus": self.vcpus,
            "vcpu_type": self.vcpu_type,
            "vcpu_sig": self.vcpu_sig,
            "guest_features": self.guest_features,
            "kernel": str(self.kernel) if self.kernel else None,
            "initrd": str(self.initrd) if self.initrd else None,
            "append": self.append,
            "measured_range": [self.launch.image_gpa, self.launch.image_gpa + self.launch.image_size],
        }


def check_launchable(info: SevLaunchInfo, mode: Mode, with_kernel: bool, source: str) -> None:
    """Raise SevMetadataError when the image cannot be launched (or measured) in ``mode``."""
    if not info.has_table:
        raise SevMetadataError(
            f"{source}: no OVMF reset-vector table (footer GUID 96b582de-...) at the end of the image: "
            "it carries no SEV metadata, so no SEV launch digest can be given for it"
        )
    if mode in (Mode.SEV_ES, Mode.SNP) and info.sev_es_ap_reset_ip is None:
        raise SevMetadataError(f"{source}: no SEV-ES reset block in the OVMF table; {mode.title} cannot start its APs")
    if mode is Mode.SNP and not info.sections:
        raise SevMetadataError(
            f"{source}: no OVMF SEV metadata (SNP sections) in the OVMF table; QEMU refuses an SEV-SNP launch "
            "of this image"
        )
    if with_kernel:
        if not info.kernel_hashes_sev:
            raise SevMetadataError(
                f"{source}: the image has no kernel-hashes page (SEV hash table block "
                f"{'absent' if info.hash_table is None else 'with base 0'}); -kernel/-initrd/-append "
                "cannot be measured with it (that needs OvmfPkg/AmdSev)"
            )
        if mode is Mode.SNP and not info.kernel_hashes_snp:
            raise SevMetadataError(f"{source}: no SNP_KERNEL_HASHES section; SEV-SNP cannot measure the kernel")


def measure(
    image: Path,
    mode: Mode,
    *,
    vcpus: int = 1,
    vcpu_type: str = DEFAULT_VCPU_TYPE,
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str | None = None,
    guest_features: int = DEFAULT_GUEST_FEATURES,
) -> Measurement:
    """The expected launch digest of ``image`` in ``mode``."""
    report = inspect_image(image)  # ImageFormatError (exit 2) for a non-image
    data = image.read_bytes()
    info = read_sev_launch_info(data)
    if vcpus < 1:
        raise MeasureError(f"--vcpus must be at least 1, not {vcpus}")
    if vcpu_type not in vcpu_types.CPU_SIGS:
        raise MeasureError(f"unknown vCPU type {vcpu_type!r}; known: {', '.join(VCPU_TYPES)}")
    if (initrd is not None or append is not None) and kernel is None:
        raise MeasureError("--initrd and --append describe a direct kernel boot: give --kernel too")
    for path in (kernel, initrd):
        if path is not None and not path.is_file():
            raise MeasureError(f"{path}: no such file")
    check_launchable(info, mode, kernel is not None, report.path)
    vcpu_sig = 0 if mode is Mode.SEV else int(vcpu_types.CPU_SIGS[vcpu_type])
    features = guest_features if mode is Mode.SNP else 0
    sev_mode = {Mode.SEV: SevMode.SEV, Mode.SEV_ES: SevMode.SEV_ES, Mode.SNP: SevMode.SEV_SNP}[mode]
    try:
        digest = snp_guest.calc_launch_digest(
            sev_mode,
            vcpus,
            vcpu_sig,
            str(image),
            str(kernel) if kernel else None,
            str(initrd) if initrd else None,
            append,
            features,
            vmm_type=VMMType.QEMU,
        )
    except (RuntimeError, ValueError) as exc:
        raise SevMetadataError(f"{image}: sev-snp-measure refused the image: {exc}") from exc
    return Measurement(
        image=image,
        image_sha256=hashlib.sha256(data).hexdigest(),
        mode=mode,
        digest=bytes(digest),
        vcpus=vcpus if mode is not Mode.SEV else 0,
        vcpu_type=vcpu_type if mode is not Mode.SEV else None,
        vcpu_sig=vcpu_sig,
        guest_features=features if mode is Mode.SNP else None,
        kernel=kernel,
        initrd=initrd,
        append=append,
        launch=info,
    )
