"""The host-built C core as a helper: the firmware's dispatcher sources,
compiled for the host (host_shim.helpers.hostcore), driven through a mailbox in
process memory with the same MigrationHelperServeOne() the SEC helper runs.

Used by the conformance suite, the fuzz-adjacent tests and ``ovmf-mh bench``.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from helper import abi
from host_shim.helpers import hostcore, keys

_DEFAULT_DATA_SIZE = 8 * 1024 * 1024


class HostCoreHelper:
    """One helper context over a guest window the caller owns.

    ``window`` must be a writable buffer (bytearray, mmap); it is used in
    place, so the caller sees imports land in it.
    """

    def __init__(
        self, window: Any, key: bytes | None, data_size: int = _DEFAULT_DATA_SIZE, *, request_flags: int = 0
    ) -> None:
        a = abi.load()
        self._lib = hostcore.load()
        self._lib.mh_create_with_flags.restype = ctypes.c_void_p
        pointer, size = ctypes.c_void_p, ctypes.c_uint64
        self._lib.mh_create_with_flags.argtypes = [pointer, size, pointer, size, pointer, size, ctypes.c_uint32]
        self._lib.mh_serve.argtypes = [ctypes.c_void_p]
        self._lib.mh_destroy.argtypes = [ctypes.c_void_p]
        header_size = a.const("OVMF_MH_MAILBOX_HEADER_SIZE")
        self._mailbox = (ctypes.c_uint8 * (header_size + data_size))()
        self._window_buffer = (ctypes.c_uint8 * len(window)).from_buffer(window) if len(window) else None
        secret = None
        if key is not None:
            page = a.const("OVMF_MH_PAGE_SIZE")
            secret = (ctypes.c_uint8 * page).from_buffer_copy(keys.secret_record(key).ljust(page, b"\0"))
        self._context = self._lib.mh_create_with_flags(
            ctypes.addressof(self._mailbox), len(self._mailbox),
            ctypes.addressof(self._window_buffer) if self._window_buffer is not None else None, len(window),
            ctypes.addressof(secret) if secret is not None else None, len(secret) if secret is not None else 0,
            request_flags,
        )
        if not self._context:
            raise MemoryError("mh_create failed")
        if secret is not None and any(secret):
            raise AssertionError("the core did not wipe the launch-secret page")
        self._layout = a.layout("OVMF_MH_MAILBOX_HEADER")
        self._codes = {name[len("OVMF_MH_CMD_") :]: value for name, value in a.constants.items()
                       if name.startswith("OVMF_MH_CMD_")}
        self._arg_count = a.const("OVMF_MH_ARG_COUNT")
        self._result_count = a.const("OVMF_MH_RESULT_COUNT")
        view = memoryview(self._mailbox).cast("B")
        self.header_view = view[:header_size]
        self.data = view[header_size:]
        self.window = memoryview(window)
        self._seq = 0

    def call(self, command: str | int, *args: int) -> tuple[int, tuple[int, ...]]:
        """Post a command, serve it, return (status, results)."""
        code = self._codes[command.upper()] if isinstance(command, str) else command
        padded = [a & 0xFFFFFFFFFFFFFFFF for a in args] + [0] * (self._arg_count - len(args))
        struct.pack_into(f"<I{self._arg_count}Q", self.header_view, self._layout.offset("Command"), code, *padded)
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        struct.pack_into("<I", self.header_view, self._layout.offset("CommandSeq"), self._seq)
        if not self._lib.mh_serve(self._context):
            raise AssertionError("the core did not see the posted command")
        status, *results = struct.unpack_from(f"<I{self._result_count}Q", self.header_view,
                                              self._layout.offset("Status"))
        return status, tuple(results)

    def header(self) -> dict[str, Any]:
        return self._layout.unpack(self.header_view)

    def close(self) -> None:
        if self._context:
            self._lib.mh_destroy(self._context)
            self._context = None
        self.header_view.release()
        self.data.release()
        self.window.release()
        # The ctypes array made by from_buffer() holds an export of the
        # caller's mmap until it goes: without this, closing the mmap raises
        # BufferError.
        self._window_buffer = None

    def __enter__(self) -> HostCoreHelper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
