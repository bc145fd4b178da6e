/* Board support shared by the Cortex-M QEMU machines (mps2-an386, mps2-an500, mps3-an547):
 * a 64-bit SysTick tick counter, the stack high-water mark (the stack is painted at reset),
 * and the semihosting command line. Printing, files and the exit code go through newlib +
 * rdimon (semihosting): printf, fopen, exit.
 *
 * Under `qemu-system-arm -icount shift=0` one guest instruction takes 1 ns of virtual time,
 * so instructions = ticks * 1e9 / clock_hz (the target's clock_hz; 40 per tick at 25 MHz). */
#ifndef ET_BOARD_H
#define ET_BOARD_H

#include <stdint.h>

#include "et_types.h"

/* Starts SysTick on the CPU clock with a wrap interrupt; ticks count from here. */
et_status et_board_clock_start(void);
/* Ticks since et_board_clock_start; the signature of et_runtime_config.clock (ctx unused). */
et_status et_board_ticks(void *ctx, uint64_t *ticks);
/* Deepest stack use since reset, in bytes, found by scanning for the reset-time paint. */
et_status et_board_stack_used(uint32_t *bytes);
/* Size of the stack region the linker script reserved. */
et_status et_board_stack_size(uint32_t *bytes);
/* The semihosting command line (QEMU -append "..."), NUL-terminated; "" when there is none. */
et_status et_board_cmdline(char *buf, uint32_t len);
/* Reset-time set-up of the stack guard: an MPU no-access region at the stack's bottom (v7-M) or
 * the MSPLIM stack limit (v8-M), so an overflow faults instead of overwriting the heap. */
void et_board_stack_guard(void);
/* Fault handlers end here: a message and a semihosting exit with an error (QEMU exit status 1). */
void et_board_fault(void);

#endif /* ET_BOARD_H */
