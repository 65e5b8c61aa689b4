"""``ovmf-mh inspect IMAGE [--json]``: what a firmware image contains, read
from the file without running it."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from host_shim.firmware.build import read_build_record
from host_shim.firmware.inspect_image import ImageReport, inspect_image
from host_shim.firmware.sev_metadata import ENTRY_NAMES, FOUR_GB, SECTION_MEASUREMENT

DESCRIPTION = """\
Read an OVMF flash image (OVMF_CODE.fd, or the combined OVMF.fd) without running
it and report:

  - its firmware volumes: offset, size, file system and name GUIDs, number of
    files, including the volumes nested in LZMA-compressed sections;
  - its SEC module: file GUID, PE32/TE, image base, whether it is linked to run
    in place at its flash address;
  - what an AMD SEV launch measurement of the image depends on: the OVMF
    reset-vector table (SEV-ES reset block, kernel-hashes table, launch-secret
    block), the SEV metadata sections an SNP launch pre-validates, and
    whether the SEC module (the helper) lies inside the measured range
    (docs/measured-launch.md);
  - whether the SEC module carries the ovmf-mh migration helper (the
    OVMF_MH_IMAGE_INFO record of HelperAbi.h) and, if so, the helper ABI
    version, capabilities, build id, the fw_cfg file name the helper reacts to,
    the launch-secret page base and the lowest address allowed for the mailbox;
  - for an image `ovmf-mh build` made, the EDK2 tree (path and version) and
    tool-chain tag it was built with, from ovmf-mh-build.json beside its FV
    folder ("build_record" in --json, null for other images).

Exit status: 0 for a firmware image, with or without the helper (the report
says which); 2 when the file is not a firmware image this tool understands
(missing, empty, truncated, corrupt); 1 for other errors.
"""

EPILOG = """\
examples:
  ovmf-mh inspect "$(ovmf-mh build)"
  ovmf-mh inspect --json /usr/share/OVMF/OVMF_CODE_4M.fd | jq .helper_present
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "inspect",
        help="report the firmware volumes, SEC module and migration helper of an image",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", type=Path, metavar="IMAGE", help="firmware image file (.fd)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as one JSON object (format 'ovmf-mh-inspect/1') instead of text",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``ovmf-mh inspect``. ImageFormatError (exit code 2) propagates
    to the dispatcher, which prints it."""
    report = inspect_image(args.image)
    record = read_build_record(args.image)
    if args.json:
        document = report.to_json()
        document["build_record"] = record
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report, sys.stdout)
        print_build_record(report, record, sys.stdout)
    return 0


def print_build_record(report: ImageReport, record: dict[str, Any] | None, out: TextIO) -> None:
    """Which EDK2 tree an image came from, from `ovmf-mh build`'s record beside it."""
    if record is None:
        return  # not an image `ovmf-mh build` made (or its record is gone)
    matches = report.helper is not None and report.helper.build_id == record.get("build_id")
    out.write(f"\nBuilt from (ovmf-mh-build.json){'' if matches else ' - build id DIFFERS from the image'}:\n")
    out.write(f"  EDK2 tree:         {record.get('edk2')} ({record.get('edk2_version', 'version not recorded')})\n")
    out.write(f"  tool chain:        {record.get('tool_chain', 'not recorded')}, target {record.get('target')}\n")


def _hex(value: int | None, width: int = 8) -> str:
    return "-" if value is None else f"{value:#0{width + 2}x}"


def print_report(report: ImageReport, out: TextIO) -> None:
    def line(text: str = "") -> None:
        out.write(text + "\n")

    line(f"Image: {report.path} ({report.size} bytes)")
    line()
    line(f"Firmware volumes ({len(report.firmware_volumes)}):")
    line(f"  {'#':>2}  {'where':<22} {'size':>10}  {'fs':<17} {'files':>5}  name GUID")
    for fv in report.firmware_volumes:
        where = f"file+{fv.offset:#x}" if fv.in_flash else f"in #{fv.parent} +{fv.offset:#x}"
        files = "-" if fv.file_count is None else str(fv.file_count)
        line(f"  {fv.index:>2}  {where:<22} {fv.size:>#10x}  {fv.file_system:<17} {files:>5}  {fv.name_guid or '-'}")
        if not fv.in_flash:
            line(f"      {'':<22} file {fv.container_file}: {fv.encapsulation}")
    line()

    sec = report.sec
    if sec is None:
        line("SEC module: not found (no SECURITY_CORE file with a PE32/TE section)")
    else:
        name = " (OvmfPkg/Sec/SecMain)" if sec.is_ovmf_sec_main else ""
        line(f"SEC module: {sec.file_guid}{name} in volume #{sec.volume}")
        line(f"  image:             {sec.image_format}, {sec.image_size:#x} bytes")
        xip = {
            True: "runs in place at its flash address",
            False: f"NOT at its flash address {_hex(sec.flash_address)}",
            None: "flash address unknown",
        }[sec.executes_in_place]
        line(f"  image base:        {_hex(sec.image_base)} ({xip})")
    line()

    helper = report.helper
    if helper is None:
        if sec is None:
            line("Migration helper: absent (no SEC module to carry it)")
        else:
            line("Migration helper: absent (no OVMF_MH_IMAGE_INFO record in the SEC module)")
    else:
        support = "" if helper.abi_supported else " (not readable by this tool)"
        line(f"Migration helper: present (OVMF_MH_IMAGE_INFO at SEC RVA {helper.record_rva:#x})")
        line(
            f"  ABI version:       {helper.abi_major}.{helper.abi_minor}{support} "
            f"(this tool: {report.tool_abi_major}.{report.tool_abi_minor})"
        )
        if helper.abi_supported:
            names = ", ".join(helper.capability_names) or "none"
            line(f"  capabilities:      {_hex(helper.capabilities, 1)} ({names})")
            line(f"  build id:          {helper.build_id} (at {_hex(helper.build_id_address)})")
            line(f"  fw_cfg request:    {', '.join(helper.fw_cfg_names)}")
            line(f"  secret page base:  {_hex(helper.secret_page_base)}")
            line(f"  mailbox min base:  {_hex(helper.mailbox_min_base)}")
    line()
    _print_launch(report, line)
    if report.notes:
        line()
        line("Notes:")
        for note in report.notes:
            line(f"  - {note}")


def _print_launch(report: ImageReport, line: Callable[[str], None]) -> None:
    info = report.sev_launch
    if info is None:
        line("SEV launch measurement: the OVMF table is corrupt (see notes)")
        return
    if not info.has_table:
        line("SEV launch measurement: no OVMF reset-vector table (no SEV metadata; `measure` refuses this image)")
        return
    line(f"SEV launch measurement (measured range {info.image_gpa:#x}..{FOUR_GB - 1:#x}, the whole image):")
    names = ", ".join(ENTRY_NAMES.get(uuid.UUID(guid), guid) for guid in info.table)
    line(f"  OVMF table:        {names}")
    reset = "absent (no SEV-ES/SNP launch)" if info.sev_es_ap_reset_ip is None else _hex(info.sev_es_ap_reset_ip)
    line(f"  SEV-ES reset:      AP reset IP {reset}")
    if info.hash_table is None:
        hashes = "no SEV hash table block"
    elif info.hash_table[0] == 0:
        hashes = "hash table block with base 0: -kernel/-initrd/-append are not measured"
    else:
        base, size = info.hash_table
        hashes = f"page at {base:#x} ({size:#x} bytes)" + ("" if info.kernel_hashes_snp else "; no SNP section")
    line(f"  kernel hashes:     {hashes}")
    if info.secret_block is None or info.secret_block[0] == 0:
        secret = "none (OVMF declares no LAUNCH_SECRET page)"
    else:
        secret = f"page at {info.secret_block[0]:#x} ({info.secret_block[1]:#x} bytes)"
    line(f"  SEV secret block:  {secret}")
    if not info.sections:
        line("  SNP metadata:      absent (no SEV-SNP launch)")
    else:
        line(f"  SNP metadata:      {len(info.sections)} sections at file offset {_hex(info.metadata_offset)}")
        for section in info.sections:
            end = section.gpa + section.size - 1
            how = SECTION_MEASUREMENT.get(section.type, "unknown type: QEMU refuses it")
            line(f"    {section.gpa:#010x}..{end:#010x} {section.type_name:<17} {how}")
    carried = "the SEC module and the migration helper in it lie" if report.helper else "the SEC module lies"
    measured = {
        True: f"yes: {carried} in the measured flash",
        False: f"NO: {carried} outside the measured flash",
        None: "unknown (no SEC module in flash)",
    }[report.sec_measured]
    line(f"  SEC measured:      {measured}")
