/* Reset for the Cortex-M QEMU machines: vector table, .data copy, .bss zero, stack paint (for
 * the high-water mark), stack guard, FPU on, newlib + rdimon semihosting, main, exit. Every
 * fault ends the simulation with an error (et_board_fault) instead of hanging. */
#include <stdint.h>
#include <stdlib.h>

#include "et_board.h"

extern uint32_t __etext, __data_start__, __data_end__, __bss_start__, __bss_end__, __StackLimit, __StackTop;
extern int main(void);
extern void initialise_monitor_handles(void); /* librdimon */
extern void __libc_init_array(void);
void Reset_Handler(void);
void SysTick_Handler(void); /* et_board.c */
void Default_Handler(void);
void _init(void);
void _fini(void);

const uint32_t et_board_stack_paint = 0xC0FFEE11u;

/* Naked, so nothing is pushed before v8-M's stack limit is lowered into the reserve kept for it. */
__attribute__((naked)) void Default_Handler(void) {
#if defined(__ARM_ARCH_8M_MAIN__) || defined(__ARM_ARCH_8_1M_MAIN__)
  __asm volatile("ldr r0, =__StackLimit\n\tmsr msplim, r0");
#endif
  __asm volatile("b et_board_fault");
}
void HardFault_Handler(void) __attribute__((weak, alias("Default_Handler")));

__attribute__((section(".isr_vector"), used)) const void *const et_vector_table[16] = {
    &__StackTop,     Reset_Handler,   Default_Handler /* NMI */, HardFault_Handler, Default_Handler,
    Default_Handler, Default_Handler, 0,
    0,               0,               0,
    Default_Handler /* SVC */,        Default_Handler,           0,
    Default_Handler /* PendSV */,     SysTick_Handler};

void Reset_Handler(void) {
  uint32_t *src = &__etext, *dst = &__data_start__;
  uintptr_t sp;
  while (dst < &__data_end__) *dst++ = *src++;
  for (dst = &__bss_start__; dst < &__bss_end__;) *dst++ = 0;
  /* Paint the stack below this frame; 256 bytes of margin cover this function and what it calls. */
  __asm volatile("mov %0, sp" : "=r"(sp));
  for (dst = &__StackLimit; (uintptr_t)dst < sp - 256u;) *(volatile uint32_t *)dst++ = et_board_stack_paint;
  et_board_stack_guard(); /* an overflow now faults instead of silently overwriting the heap */
#if defined(__ARM_FP)
  *(volatile uint32_t *)0xE000ED88u |= (0xFu << 20); /* CPACR: CP10/CP11 full access */
  __asm volatile("dsb\n\tisb");
#endif
  initialise_monitor_handles();
  __libc_init_array();
  exit(main());
}

/* -nostartfiles drops crti/crtn; newlib's __libc_init_array / __libc_fini_array still call these. */
void _init(void) {}
void _fini(void) {}
