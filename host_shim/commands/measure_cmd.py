"""``ovmf-mh measure IMAGE --mode sev|seves|snp ...``: the launch digest a
guest owner expects the AMD secure processor to report for an image."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from host_shim.firmware.measure import DEFAULT_GUEST_FEATURES, DEFAULT_VCPU_TYPE, VCPU_TYPES, Mode, measure

DESCRIPTION = """\
Compute the expected AMD SEV launch digest of an OVMF image (OVMF_CODE.fd, or
the combined OVMF.fd when that is the flash QEMU is given) with the
sev-snp-measure library, for a QEMU launch in the given mode:

  sev    SHA-256 over the flash image (LAUNCH_UPDATE_DATA), then the kernel
         hashes table when --kernel is given;
  seves  as sev, then one VMSA page per vCPU (LAUNCH_UPDATE_VMSA);
  snp    SHA-384 chain of SNP_LAUNCH_UPDATE: the flash pages, the pages of
         the image's SEV metadata sections, then one VMSA per vCPU.

Before computing, the image is checked: it must be a firmware image and carry
what the mode needs (the OVMF reset-vector table; the SEV-ES reset block for
seves and snp; the SNP metadata sections for snp; a kernel-hashes page for
--kernel). `ovmf-mh inspect IMAGE` lists all of these.

Exit status: 0 with the digest; 2 when the file is not a firmware image, lacks
the SEV metadata the mode needs, or the arguments cannot describe a launch;
1 for other errors. See docs/measured-launch.md.
"""

EPILOG = """\
examples:
  ovmf-mh measure Build/OvmfMhX64/DEBUG_GCC5/FV/OVMF_CODE.fd --mode snp --vcpus 2
  ovmf-mh measure /usr/share/OVMF/OVMF_CODE.fd --mode seves --vcpu-type EPYC-Milan --json
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "measure",
        help="expected SEV / SEV-ES / SEV-SNP launch digest of a firmware image",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", type=Path, metavar="IMAGE", help="firmware image file (.fd) QEMU maps as flash")
    parser.add_argument(
        "--mode", required=True, choices=[m.value for m in Mode], help="SEV generation of the launch (required)"
    )
    parser.add_argument(
        "--vcpus", type=int, default=1, metavar="N", help="number of vCPUs (seves, snp: one VMSA each; default 1)"
    )
    parser.add_argument(
        "--vcpu-type",
        default=DEFAULT_VCPU_TYPE,
        choices=VCPU_TYPES,
        metavar="TYPE",
        help=f"QEMU CPU model, for the CPUID signature in each VMSA (seves, snp; default {DEFAULT_VCPU_TYPE}); "
        f"one of {', '.join(VCPU_TYPES)}",
    )
    parser.add_argument(
        "--guest-features",
        type=lambda text: int(text, 0),
        default=DEFAULT_GUEST_FEATURES,
        metavar="BITS",
        help=f"SNP SEV_FEATURES of the VMSAs (snp only; default {DEFAULT_GUEST_FEATURES:#x}, SNPActive)",
    )
    parser.add_argument("--kernel", type=Path, metavar="K", help="kernel given to QEMU with -kernel (default: none)")
    parser.add_argument("--initrd", type=Path, metavar="I", help="initrd given with -initrd (needs --kernel)")
    parser.add_argument("--append", metavar="A", help="kernel command line given with -append (needs --kernel)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (format 'ovmf-mh-measure/1') instead of text"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``ovmf-mh measure``; OvmfMhError subclasses carry the exit code."""
    result = measure(
        args.image,
        Mode(args.mode),
        vcpus=args.vcpus,
        vcpu_type=args.vcpu_type,
        kernel=args.kernel,
        initrd=args.initrd,
        append=args.append,
        guest_features=args.guest_features,
    )
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    out = sys.stdout
    out.write(f"Image:        {result.image} (sha256 {result.image_sha256})\n")
    launch = f"{result.mode.title}"
    if result.mode is not Mode.SEV:
        launch += f", {result.vcpus} vCPU(s) of type {result.vcpu_type} (CPUID signature {result.vcpu_sig:#x})"
    if result.guest_features is not None:
        launch += f", guest features {result.guest_features:#x}"
    out.write(f"Launch:       {launch}\n")
    if result.kernel:
        out.write(f"Direct boot:  kernel {result.kernel}, initrd {result.initrd or '-'}, append {result.append!r}\n")
    out.write(f"Digest ({result.mode.algorithm}): {result.digest.hex()}\n")
    return 0
