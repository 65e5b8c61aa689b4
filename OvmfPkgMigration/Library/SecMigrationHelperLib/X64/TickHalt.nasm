;------------------------------------------------------------------------------
; @file
;   The helper's tick window (docs/mailbox.md, "Idle and wake"): one tick of
;   "look at CommandSeq, then halt until the next timer interrupt", and the
;   8259 PIC's interrupt handlers.
;
;   Interrupts stay off everywhere except the STI; HLT pair below. STI enables
;   them only after the next instruction, so an IRQ0 that arrives after the
;   look at CommandSeq is taken once HLT has begun and ends it: the check and
;   the halt cannot race. The host does not wake a helper in its tick window
;   (the idle word says busy); the next tick picks its command up.
;
;   SPDX-License-Identifier: BSD-2-Clause-Patent
;------------------------------------------------------------------------------

    DEFAULT REL
    SECTION .text

;
; 8259 PIC command ports and the non-specific end-of-interrupt (OCW2).
;
%define PIC_MASTER_COMMAND  0x20
%define PIC_SLAVE_COMMAND   0xA0
%define PIC_EOI             0x20

;
; Results of InternalHelperTickHalt (SEC_MH_TICK_* in
; SecMigrationHelperInternal.h).
;
%define RESULT_TICK         0
%define RESULT_POSTED       1

;------------------------------------------------------------------------------
; UINT32
; EFIAPI
; InternalHelperTickHalt (
;   IN volatile UINT32  *CommandSeq,    // rcx
;   IN UINT32           LastSeq         // edx
;   );
;------------------------------------------------------------------------------
global ASM_PFX(InternalHelperTickHalt)
ASM_PFX(InternalHelperTickHalt):
    cli
    mov     eax, [rcx]
    cmp     eax, edx
    jne     .Posted
    sti                                 ; takes effect after the HLT has begun
    hlt
    cli
    mov     eax, RESULT_TICK
    ret
.Posted:
    mov     eax, RESULT_POSTED
    ret

;------------------------------------------------------------------------------
; Handler of vectors 0x20-0x27 (master PIC: IRQ0 is the tick, the others are
; masked). Ends the interrupt at the master and returns. A spurious IRQ7 sets
; no in-service bit, so its end-of-interrupt ends nothing.
;------------------------------------------------------------------------------
global ASM_PFX(InternalHelperPicMasterInterrupt)
ASM_PFX(InternalHelperPicMasterInterrupt):
    push    rax
    mov     al, PIC_EOI
    out     PIC_MASTER_COMMAND, al
    pop     rax
    iretq

;------------------------------------------------------------------------------
; Handler of vectors 0x28-0x2F (slave PIC, all masked): ends the interrupt at
; the slave and at the master (cascade) and returns.
;------------------------------------------------------------------------------
global ASM_PFX(InternalHelperPicSlaveInterrupt)
ASM_PFX(InternalHelperPicSlaveInterrupt):
    push    rax
    mov     al, PIC_EOI
    out     PIC_SLAVE_COMMAND, al
    out     PIC_MASTER_COMMAND, al
    pop     rax
    iretq
