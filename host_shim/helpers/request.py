"""The fw_cfg request that diverts the firmware into helper mode."""

from __future__ import annotations

from dataclasses import dataclass

from helper import abi


@dataclass(frozen=True)
class HelperRequest:
    mailbox_base: int
    mailbox_size: int
    guest_window_base: int = 0
    guest_window_size: int = 0
    version: int | None = None
    signature: int | None = None
    flags: int = 0

    def encode(self) -> bytes:
        a = abi.load()
        layout = a.layout("OVMF_MH_REQUEST")
        return layout.pack(
            Signature=a.const("OVMF_MH_REQUEST_SIGNATURE") if self.signature is None else self.signature,
            Version=a.const("OVMF_MH_REQUEST_VERSION") if self.version is None else self.version,
            Size=layout.size,
            Flags=self.flags,
            MailboxBase=self.mailbox_base,
            MailboxSize=self.mailbox_size,
            GuestWindowBase=self.guest_window_base,
            GuestWindowSize=self.guest_window_size,
        )


def fw_cfg_name() -> str:
    return abi.load().strings["OVMF_MH_REQUEST_FW_CFG_NAME"]
