/** @file
  The tick of the helper's tick window: the 8259 PIC (vector base 0x20, all
  lines masked but IRQ0 while ticking) and the 8254 PIT's channel 0, a rate
  generator while the window lasts and stopped (a one-shot count that has
  ended) otherwise, so that a helper in its deep halt costs QEMU no timer
  (docs/mailbox.md, "Idle and wake").

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <Library/IoLib.h>

#include "SecMigrationHelperInternal.h"

#define SEC_MH_PIC_MASTER_COMMAND  0x20
#define SEC_MH_PIC_MASTER_DATA     0x21
#define SEC_MH_PIC_SLAVE_COMMAND   0xA0
#define SEC_MH_PIC_SLAVE_DATA      0xA1
#define SEC_MH_PIC_ICW1_ICW4       0x11      ///< ICW1: edge triggered, cascaded, ICW4 follows
#define SEC_MH_PIC_ICW3_MASTER     0x04      ///< The slave hangs on IRQ2
#define SEC_MH_PIC_ICW3_SLAVE      0x02      ///< Its cascade identity
#define SEC_MH_PIC_ICW4_8086       0x01
#define SEC_MH_PIC_MASK_ALL        0xFF
#define SEC_MH_PIC_MASK_BUT_IRQ0   0xFE
#define SEC_MH_PIC_PROBE_MASK      0xA5

#define SEC_MH_PIT_CHANNEL0        0x40
#define SEC_MH_PIT_CONTROL         0x43
#define SEC_MH_PIT_HZ              1193182
#define SEC_MH_PIT_CH0_STATUS      0xE2      ///< Read-back: latch channel 0's status byte only
#define SEC_MH_PIT_STATUS_MODE     0x3F      ///< Status bits: access mode, counting mode, BCD
#define SEC_MH_PIT_CH0_ONE_SHOT    0x30      ///< Channel 0, low then high byte, mode 0, binary
#define SEC_MH_PIT_CH0_RATE        0x34      ///< Channel 0, low then high byte, mode 2, binary

/**
  Load channel 0 of the PIT with a mode and a count.

  @param[in] Control  The control word (SEC_MH_PIT_CH0_*).
  @param[in] Count    The count, low byte first.
**/
STATIC
VOID
InternalPitLoad (
  IN UINT8   Control,
  IN UINT16  Count
  )
{
  IoWrite8 (SEC_MH_PIT_CONTROL, Control);
  IoWrite8 (SEC_MH_PIT_CHANNEL0, (UINT8)Count);
  IoWrite8 (SEC_MH_PIT_CHANNEL0, (UINT8)(Count >> 8));
}

/**
  Stop the tick: mask IRQ0 and end channel 0's periodic count with a one-shot
  count of 1 (QEMU's i8254 arms no timer after a mode 0 count has ended).
**/
VOID
InternalHelperTickStop (
  VOID
  )
{
  IoWrite8 (SEC_MH_PIC_MASTER_DATA, SEC_MH_PIC_MASK_ALL);
  InternalPitLoad (SEC_MH_PIT_CH0_ONE_SHOT, 1);
}

/**
  Start the tick: channel 0 as a rate generator at OVMF_MH_IDLE_TICK_HZ and
  IRQ0 unmasked. Interrupts stay off (only InternalHelperTickHalt enables
  them, around its HLT).
**/
VOID
InternalHelperTickStart (
  VOID
  )
{
  InternalPitLoad (SEC_MH_PIT_CH0_RATE, (UINT16)((SEC_MH_PIT_HZ + OVMF_MH_IDLE_TICK_HZ / 2) / OVMF_MH_IDLE_TICK_HZ));
  IoWrite8 (SEC_MH_PIC_MASTER_DATA, SEC_MH_PIC_MASK_BUT_IRQ0);
}

/**
  Find the PIC and the PIT, initialize the PIC (vectors 0x20-0x2F, every
  line masked) and leave the PIT stopped.

  Without either chip a halt with interrupts on would never end, so the
  caller then keeps the helper out of the tick window.

  @retval TRUE   Both answer; the tick can run.
  @retval FALSE  The PIC's mask register or the PIT's status byte does
                 not answer (a machine without them).
**/
BOOLEAN
InternalHelperTickInitialize (
  VOID
  )
{
  UINT8  Mask;
  UINT8  Status;

  IoWrite8 (SEC_MH_PIC_MASTER_COMMAND, SEC_MH_PIC_ICW1_ICW4);
  IoWrite8 (SEC_MH_PIC_MASTER_DATA, SEC_MH_TICK_VECTOR_BASE);
  IoWrite8 (SEC_MH_PIC_MASTER_DATA, SEC_MH_PIC_ICW3_MASTER);
  IoWrite8 (SEC_MH_PIC_MASTER_DATA, SEC_MH_PIC_ICW4_8086);
  IoWrite8 (SEC_MH_PIC_SLAVE_COMMAND, SEC_MH_PIC_ICW1_ICW4);
  IoWrite8 (SEC_MH_PIC_SLAVE_DATA, SEC_MH_TICK_VECTOR_BASE + 8);
  IoWrite8 (SEC_MH_PIC_SLAVE_DATA, SEC_MH_PIC_ICW3_SLAVE);
  IoWrite8 (SEC_MH_PIC_SLAVE_DATA, SEC_MH_PIC_ICW4_8086);

  IoWrite8 (SEC_MH_PIC_MASTER_DATA, SEC_MH_PIC_PROBE_MASK);
  Mask = IoRead8 (SEC_MH_PIC_MASTER_DATA);
  IoWrite8 (SEC_MH_PIC_MASTER_DATA, SEC_MH_PIC_MASK_ALL);
  IoWrite8 (SEC_MH_PIC_SLAVE_DATA, SEC_MH_PIC_MASK_ALL);

  //
  // Channel 0's status byte (read-back command) echoes the mode just
  // loaded; an absent PIT reads 0xFF. Not the count: a vCPU preempted for
  // longer than the count lasts would see a mode 0 count wrap.
  //
  InternalHelperTickStop ();
  IoWrite8 (SEC_MH_PIT_CONTROL, SEC_MH_PIT_CH0_STATUS);
  Status = IoRead8 (SEC_MH_PIT_CHANNEL0);
  return (BOOLEAN)((Mask == SEC_MH_PIC_PROBE_MASK) &&
                   ((Status & SEC_MH_PIT_STATUS_MODE) == SEC_MH_PIT_CH0_ONE_SHOT));
}
