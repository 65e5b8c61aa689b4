;------------------------------------------------------------------------------
; @file
;   Exception entry stubs of the SEC migration helper: one 16-byte stub per
;   vector 0..31 that pushes a uniform frame and calls InternalHelperFault,
;   except vector 2 (NMI, the host's wake-up), whose stub jumps to
;   InternalHelperNmiHandler (IdleHalt.nasm), which returns.
;
;   SPDX-License-Identifier: BSD-2-Clause-Patent
;------------------------------------------------------------------------------

    DEFAULT REL
    SECTION .text

extern ASM_PFX(InternalHelperFault)
extern ASM_PFX(InternalHelperNmiHandler)

;
; Vectors for which the CPU pushes an error code itself.
;
%define HAS_ERROR_CODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || (v) == 21 || (v) == 29 || (v) == 30)

%macro EXCEPTION_STUB 1
    align 16
%if (%1) == 2
    jmp     strict near ASM_PFX(InternalHelperNmiHandler)
%elif HAS_ERROR_CODE(%1)
    nop
    nop
%else
    push    byte 0
%endif
%if (%1) != 2
    push    byte %1
    jmp     strict near CommonFault
%endif
%endmacro

global ASM_PFX(InternalHelperExceptionStubs)
    align 16
ASM_PFX(InternalHelperExceptionStubs):
%assign Vector 0
%rep 32
    EXCEPTION_STUB Vector
%assign Vector Vector + 1
%endrep

;
; Stack on entry: vector, error code, RIP, CS, RFLAGS, RSP, SS.
;
CommonFault:
    mov     rcx, [rsp]
    mov     rdx, [rsp + 8]
    mov     r8, [rsp + 16]
    and     rsp, -16
    sub     rsp, 32
    call    ASM_PFX(InternalHelperFault)
.Hang:
    cli
    hlt
    jmp     .Hang
