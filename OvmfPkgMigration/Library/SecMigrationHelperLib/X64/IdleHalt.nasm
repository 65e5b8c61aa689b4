;------------------------------------------------------------------------------
; @file
;   The helper's idle halt and its NMI handler (docs/mailbox.md, "Idle and
;   wake").
;
;   InternalHelperIdleHalt publishes the idle word, fences, looks at
;   CommandSeq one last time and halts with interrupts off. The host posts
;   CommandSeq first and reads the idle word after it, so either the helper's
;   re-check sees the command or the host sees the idle word and sends an NMI.
;   That NMI can land anywhere: during HLT it simply ends the halt; between
;   the function's entry and the HLT (the window) the handler moves the
;   return address past the HLT, so the helper never halts after a wake it
;   has already taken. Spurious NMIs (outside the window) return at once.
;
;   SPDX-License-Identifier: BSD-2-Clause-Patent
;------------------------------------------------------------------------------

    DEFAULT REL
    SECTION .text

;
; OVMF_MH_IDLE_* (HelperAbi.h) and the results of InternalHelperIdleHalt
; (SEC_MH_IDLE_* in SecMigrationHelperInternal.h).
;
%define IDLE_BUSY          0
%define IDLE_HALTING       1
%define IDLE_STRETCHED     2
%define RESULT_WOKEN       0
%define RESULT_WINDOW      1
%define RESULT_POSTED      2

;
; ACPI PM timer: SEC_MH_PM_BASE + 8 (HelperPlatform.c), 3.579545 MHz, 24 bits.
;
%define PM_TIMER_PORT      0x608
%define PM_TIMER_MASK      0xFFFFFF

;------------------------------------------------------------------------------
; UINT32
; EFIAPI
; InternalHelperIdleHalt (
;   IN volatile UINT32  *Idle,          // rcx
;   IN volatile UINT32  *CommandSeq,    // rdx
;   IN UINT32           LastSeq,        // r8d
;   IN UINT64           StretchTicks    // r9: 0, or test-only PM timer ticks
;   );
;------------------------------------------------------------------------------
global ASM_PFX(InternalHelperIdleHalt)
ASM_PFX(InternalHelperIdleHalt):
IdleWindowStart:
    mov     dword [rcx], IDLE_HALTING
    mfence                              ; the idle word is visible before the re-check
    mov     eax, [rdx]
    cmp     eax, r8d
    jne     IdleHaltPosted
    test    r9, r9
    jz      IdleWindowHlt
    ;
    ; Test knob only: stay inside the window, past the re-check, for
    ; StretchTicks, and say so, so that a test can post and wake exactly here.
    ;
    mov     dword [rcx], IDLE_STRETCHED
    mov     r10, rdx
    mov     dx, PM_TIMER_PORT
    in      eax, dx
    mov     r11d, eax
IdleHaltStretch:
    pause
    in      eax, dx
    sub     eax, r11d
    and     eax, PM_TIMER_MASK
    cmp     rax, r9
    jb      IdleHaltStretch
    mov     rdx, r10
IdleWindowHlt:
    hlt                                 ; interrupts are off: only an NMI (or reset) ends it
    mov     eax, RESULT_WOKEN
    jmp     IdleHaltDone
IdleWindowResume:
    mov     eax, RESULT_WINDOW
    jmp     IdleHaltDone
IdleHaltPosted:
    mov     eax, RESULT_POSTED
IdleHaltDone:
    mov     dword [rcx], IDLE_BUSY
    ret

;------------------------------------------------------------------------------
; NMI handler (vector 2; the vector's exception stub jumps here). Stack on
; entry: RIP, CS, RFLAGS, RSP, SS. IRETQ ends NMI blocking, so the next NMI
; is taken again.
;------------------------------------------------------------------------------
global ASM_PFX(InternalHelperNmiHandler)
ASM_PFX(InternalHelperNmiHandler):
    push    rax
    push    rdx
    mov     rax, [rsp + 16]             ; interrupted RIP
    lea     rdx, [IdleWindowStart]
    cmp     rax, rdx
    jb      .Return
    lea     rdx, [IdleWindowHlt]
    cmp     rax, rdx
    ja      .Return                     ; after the HLT: the halt itself ended
    lea     rdx, [IdleWindowResume]
    mov     [rsp + 16], rdx
.Return:
    pop     rdx
    pop     rax
    iretq
