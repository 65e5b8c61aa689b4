"""The Python view of the ABI (parsed from HelperAbi.h) against gcc's view
of the same header: every struct size, field offset and constant."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helper import abi
from host_shim import paths


def _c_program(parsed: abi.Abi) -> str:
    lines = [
        # Declared before Base.h: EDK2's X64 ProcessorBind.h hides later symbols,
        # and libc's headers clash with Base.h's NULL.
        "int printf (const char *Format, ...);",
        "#include <Base.h>",
        "#include <MigrationHelper/HelperAbi.h>",
        "int main (void) {",
    ]
    for layout in parsed.layouts.values():
        lines.append(f'  printf ("size {layout.name} %lu\\n", (unsigned long)sizeof ({layout.name}));')
        for field in layout.fields:
            lines.append(
                f'  printf ("offset {layout.name}.{field.name} %lu\\n", '
                f"(unsigned long)OFFSET_OF ({layout.name}, {field.name}));"
            )
            lines.append(
                f'  printf ("fieldsize {layout.name}.{field.name} %lu\\n", '
                f"(unsigned long)sizeof ((({layout.name} *)0)->{field.name}));"
            )
    for name in parsed.constants:
        lines.append(f'  printf ("const {name} %llu\\n", (unsigned long long)({name}));')
    for name in parsed.strings:
        lines.append(f'  printf ("string {name}\\t%s\\n", {name});')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def gcc_view(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    parsed = abi.load()
    work = tmp_path_factory.mktemp("abi")
    source = work / "abi_dump.c"
    source.write_text(_c_program(parsed))
    binary = work / "abi_dump"
    edk2 = paths.edk2_tree()
    result = subprocess.run(
        [
            "gcc", "-Wall", "-Werror", "-fshort-wchar", "-o", str(binary), str(source),
            f"-I{edk2 / 'MdePkg/Include'}", f"-I{edk2 / 'MdePkg/Include/X64'}",
            f"-I{paths.PACKAGE_DIR / 'Include'}",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"gcc could not compile the ABI dump:\n{result.stderr}"
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    # Strings are tab-separated (they may contain spaces); numbers end after the last space.
    view = {}
    for line in out.splitlines():
        key, value = line.split("\t", 1) if "\t" in line else line.rsplit(" ", 1)
        view[key] = value
    return view


def test_every_struct_size_and_offset_matches_gcc(gcc_view: dict[str, str]) -> None:
    parsed = abi.load()
    assert parsed.layouts, "no structs parsed"
    for layout in parsed.layouts.values():
        assert int(gcc_view[f"size {layout.name}"]) == layout.size, layout.name
        assert layout.struct.size == layout.size, layout.name
        for field in layout.fields:
            key = f"{layout.name}.{field.name}"
            assert int(gcc_view[f"offset {key}"]) == field.offset, key
            assert int(gcc_view[f"fieldsize {key}"]) == field.size, key


def test_every_constant_matches_gcc(gcc_view: dict[str, str]) -> None:
    parsed = abi.load()
    for name, value in parsed.constants.items():
        assert int(gcc_view[f"const {name}"]) == value, name
    for name, text in parsed.strings.items():
        assert gcc_view[f"string {name}"] == text, name


def test_signatures_spell_what_the_docs_say() -> None:
    parsed = abi.load()
    assert parsed.const("OVMF_MH_MAILBOX_SIGNATURE").to_bytes(8, "little") == b"OVMFMHMB"
    assert parsed.const("OVMF_MH_REQUEST_SIGNATURE").to_bytes(4, "little") == b"OMHR"


def test_pack_unpack_round_trip() -> None:
    layout = abi.load().layout("OVMF_MH_REQUEST")
    blob = layout.pack(Signature=1, Version=2, Size=3, MailboxBase=0x1234, WindowBase=[0x5000, 1 << 32])
    assert len(blob) == layout.size
    decoded = layout.unpack(blob)
    assert decoded["MailboxBase"] == 0x1234
    assert decoded["WindowBase"] == (0x5000, 1 << 32, 0, 0, 0, 0, 0, 0)
    with pytest.raises(KeyError):
        layout.pack(NoSuchField=1)


def test_parser_rejects_what_it_does_not_understand() -> None:
    with pytest.raises(abi.AbiParseError):
        abi.parse_header("#pragma pack(1)\ntypedef struct { float X; } BAD;\n#pragma pack()\n")
    with pytest.raises(abi.AbiParseError):
        abi.parse_header("typedef struct { UINT32 X; } UNPACKED;\n")
    with pytest.raises(abi.AbiParseError):
        abi.parse_header("#define A (B + 1)\n")


def test_header_is_the_installed_one() -> None:
    assert abi.header_path() == paths.REPO_ROOT / abi.HEADER_RELATIVE
    assert Path(abi.load().source).is_file()
