"""The helper ABI as data, parsed from the one C header.

``OvmfPkgMigration/Include/MigrationHelper/HelperAbi.h`` is the single
definition of every structure the host shares with the helper. This module
reads that file (packaged with the distribution) and builds, for each packed
struct, a :class:`Layout` with field offsets and ``struct`` formats, and a
table of the integer and string ``#define`` constants. Nothing is typed twice:
``tests/test_abi.py`` compiles the same header with gcc and compares every
offset and size against this parse.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

HEADER_RELATIVE = Path("OvmfPkgMigration/Include/MigrationHelper/HelperAbi.h")

_SCALARS: Mapping[str, tuple[str, int]] = {
    "UINT8": ("B", 1),
    "UINT16": ("H", 2),
    "UINT32": ("I", 4),
    "UINT64": ("Q", 8),
}


class AbiParseError(RuntimeError):
    """The header uses a construct this parser does not understand."""


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str
    offset: int
    count: int  # 1 for scalars, N for arrays
    size: int  # total bytes

    @property
    def struct_format(self) -> str:
        code, _ = _SCALARS[self.ctype]
        if self.ctype == "UINT8" and self.count > 1:
            return f"{self.count}s"
        return f"{self.count}{code}" if self.count > 1 else code


@dataclass(frozen=True)
class Layout:
    name: str
    fields: tuple[Field, ...]
    size: int

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name}")

    def offset(self, name: str) -> int:
        return self.field(name).offset

    @property
    def struct(self) -> struct.Struct:
        return struct.Struct("<" + "".join(f.struct_format for f in self.fields))

    def unpack(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        """Decode a buffer of exactly ``size`` bytes into a dict of fields;
        UINT8 arrays become bytes, other arrays tuples."""
        if len(data) != self.size:
            raise ValueError(f"{self.name} needs {self.size} bytes, got {len(data)}")
        values = self.struct.unpack(bytes(data))
        out: dict[str, Any] = {}
        index = 0
        for f in self.fields:
            if f.ctype == "UINT8" and f.count > 1:
                out[f.name] = values[index]
                index += 1
            elif f.count > 1:
                out[f.name] = tuple(values[index : index + f.count])
                index += f.count
            else:
                out[f.name] = values[index]
                index += 1
        return out

    def pack(self, **values: Any) -> bytes:
        """Encode fields by name; fields not given are zero."""
        unknown = set(values) - {f.name for f in self.fields}
        if unknown:
            raise KeyError(f"{self.name} has no fields {sorted(unknown)}")
        flat: list[Any] = []
        for f in self.fields:
            value = values.get(f.name)
            if f.ctype == "UINT8" and f.count > 1:
                flat.append(bytes(value or b""))
            elif f.count > 1:
                items = list(value or ())
                flat.extend(items + [0] * (f.count - len(items)))
            else:
                flat.append(value or 0)
        return self.struct.pack(*flat)


@dataclass(frozen=True)
class Abi:
    constants: Mapping[str, int]
    strings: Mapping[str, str]
    layouts: Mapping[str, Layout]
    source: Path

    def const(self, name: str) -> int:
        return self.constants[name]

    def layout(self, name: str) -> Layout:
        return self.layouts[name]

    def names_with_prefix(self, prefix: str) -> dict[int, str]:
        """Map value -> name for constants sharing a prefix (status codes...)."""
        return {v: k[len(prefix) :] for k, v in self.constants.items() if k.startswith(prefix)}


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", "", text)


def _evaluate(expr: str, constants: Mapping[str, int]) -> int:
    expr = expr.strip()
    expr = re.sub(r"(?<=[0-9a-fA-F])(ULL|UL|U|LL|L)\b", "", expr)
    tokens = re.findall(r"[A-Za-z_]\w*", re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)\b", "", expr))
    for token in tokens:
        if token not in constants:
            raise AbiParseError(f"unknown name {token!r} in expression {expr!r}")
    if not re.fullmatch(r"[\w\s()+\-*|<>]+", expr):
        raise AbiParseError(f"unsupported expression {expr!r}")
    # The grammar check above leaves only integers, known names and operators.
    value = eval(expr, {"__builtins__": {}}, dict(constants))
    if not isinstance(value, int):
        raise AbiParseError(f"expression {expr!r} is not an integer")
    return value


def parse_header(text: str, source: Path = Path("<string>")) -> Abi:
    """Parse the restricted C subset HelperAbi.h is written in."""
    constants: dict[str, int] = {}
    strings: dict[str, str] = {}
    layouts: dict[str, Layout] = {}
    code = _strip_comments(text)

    for match in re.finditer(r"^[ \t]*#define[ \t]+(\w+)[ \t]+(.+?)[ \t]*$", code, re.MULTILINE):
        name, value = match.groups()
        if name.endswith("_H_"):
            continue
        if value.startswith('"'):
            strings[name] = value.strip('"')
        else:
            constants[name] = _evaluate(value, constants)

    packed = False
    for chunk in re.finditer(
        r"#pragma\s+pack\s*\(\s*(\d*)\s*\)|typedef\s+struct\s*\{(?P<body>.*?)\}\s*(?P<name>\w+)\s*;",
        code,
        re.DOTALL,
    ):
        if chunk.group(0).startswith("#pragma"):
            packed = chunk.group(1) == "1"
            continue
        name = chunk.group("name")
        if not packed:
            raise AbiParseError(f"struct {name} is not inside #pragma pack(1)")
        fields: list[Field] = []
        offset = 0
        for decl in chunk.group("body").split(";"):
            decl = decl.strip()
            if not decl:
                continue
            m = re.fullmatch(r"(\w+)\s+(\w+)\s*(?:\[\s*([^\]]+)\s*\])?", decl)
            if m is None or m.group(1) not in _SCALARS:
                raise AbiParseError(f"unsupported declaration in {name}: {decl!r}")
            ctype, fname, count_expr = m.groups()
            count = _evaluate(count_expr, constants) if count_expr else 1
            size = _SCALARS[ctype][1] * count
            fields.append(Field(fname, ctype, offset, count, size))
            offset += size
        layouts[name] = Layout(name, tuple(fields), offset)

    return Abi(constants, strings, layouts, source)


def header_path() -> Path:
    """Locate HelperAbi.h: in the source checkout this package lives in."""
    here = Path(__file__).resolve().parents[1] / HEADER_RELATIVE
    if here.is_file():
        return here
    raise FileNotFoundError(
        f"{HEADER_RELATIVE} not found next to the helper package; ovmf-mh runs from a "
        "source checkout (pip install -e .)"
    )


@cache
def load() -> Abi:
    """The ABI of this checkout, parsed once."""
    path = header_path()
    return parse_header(path.read_text(), path)
