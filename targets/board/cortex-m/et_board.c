#include "et_board.h"

#include <errno.h>
#include <stddef.h>

#define ET_SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define ET_SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define ET_SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define ET_SCB_ICSR (*(volatile uint32_t *)0xE000ED04u)
#define ET_ICSR_PENDSTSET (1u << 26)
#define ET_SYST_PERIOD 0x1000000ull /* 24-bit counter: RVR = 0xFFFFFF */

/* Written by startup.c's reset handler and the linker script. */
extern uint32_t __StackLimit, __StackTop, __HeapBase, __HeapLimit;
extern const uint32_t et_board_stack_paint;

/* v7-M: the MPU guard region takes the lowest 32 bytes of the stack (the region's minimum size) */
#if defined(__ARM_ARCH_7EM__) || defined(__ARM_ARCH_7M__)
#define ET_STACK_GUARD 32u
#else
#define ET_STACK_GUARD 0u
#endif
#define ET_MPU_CTRL (*(volatile uint32_t *)0xE000ED94u)
#define ET_MPU_RNR (*(volatile uint32_t *)0xE000ED98u)
#define ET_MPU_RBAR (*(volatile uint32_t *)0xE000ED9Cu)
#define ET_MPU_RASR (*(volatile uint32_t *)0xE000EDA0u)

static volatile uint32_t et_systick_wraps;

void SysTick_Handler(void) { et_systick_wraps += 1u; }

et_status et_board_clock_start(void) {
  ET_SYST_CSR = 0;
  ET_SYST_RVR = 0xFFFFFFu;
  ET_SYST_CVR = 0;
  et_systick_wraps = 0;
  ET_SYST_CSR = 7u; /* ENABLE | TICKINT | CLKSOURCE = CPU clock */
  return ET_OK;
}

et_status et_board_ticks(void *ctx, uint64_t *ticks) {
  uint32_t primask, cvr, wraps;
  (void)ctx;
  if (ticks == NULL) return ET_E_ARG;
  __asm volatile("mrs %0, primask\n\tcpsid i" : "=r"(primask)::"memory");
  cvr = ET_SYST_CVR;
  wraps = et_systick_wraps;
  /* wrapped but the interrupt has not run yet (interrupts are off): count it here */
  if (ET_SCB_ICSR & ET_ICSR_PENDSTSET) {
    cvr = ET_SYST_CVR;
    wraps += 1u;
  }
  __asm volatile("msr primask, %0" ::"r"(primask) : "memory");
  /* CVR is 0 right after the start, then RVR, RVR-1, ..., 0 (the wrap interrupt), RVR, ... */
  *ticks = (uint64_t)wraps * ET_SYST_PERIOD + (uint64_t)((0x1000000u - cvr) & 0xFFFFFFu);
  return ET_OK;
}

void et_board_stack_guard(void) {
#if ET_STACK_GUARD > 0
  ET_MPU_RNR = 0;
  ET_MPU_RBAR = (uint32_t)(uintptr_t)&__StackLimit; /* 32-byte aligned by the linker script */
  ET_MPU_RASR = (1u << 28) /* XN */ | (0u << 24) /* AP: no access */ | (4u << 1) /* 2^(4+1) bytes */ | 1u;
  ET_MPU_CTRL = (1u << 2) /* PRIVDEFENA: default map elsewhere */ | 1u;
  __asm volatile("dsb\n\tisb" ::: "memory");
#elif defined(__ARM_ARCH_8M_MAIN__) || defined(__ARM_ARCH_8_1M_MAIN__)
  /* 64 bytes above the bottom: the fault handler lowers the limit and reports from there */
  __asm volatile("msr msplim, %0" ::"r"((uintptr_t)&__StackLimit + 64u));
#endif
}

et_status et_board_stack_used(uint32_t *bytes) {
  const uint32_t *p = (const uint32_t *)((uintptr_t)&__StackLimit + ET_STACK_GUARD);
  if (bytes == NULL) return ET_E_ARG;
  while (p < &__StackTop && *p == et_board_stack_paint) ++p;
  *bytes = (uint32_t)((uintptr_t)&__StackTop - (uintptr_t)p);
  return ET_OK;
}

et_status et_board_stack_size(uint32_t *bytes) {
  if (bytes == NULL) return ET_E_ARG;
  *bytes = (uint32_t)((uintptr_t)&__StackTop - (uintptr_t)&__StackLimit - ET_STACK_GUARD);
  return ET_OK;
}

/* ARM semihosting call: operation in r0, parameter block in r1, result in r0. */
static int32_t et_semihost(int32_t op, void *block) {
  register int32_t r0 __asm("r0") = op;
  register void *r1 __asm("r1") = block;
  __asm volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

void et_board_fault(void) {
  static const char msg[] = "edgetune board: fault (stack overflow, bad memory access or bad instruction)\n";
  et_semihost(0x04 /* SYS_WRITE0 */, (void *)msg);
  et_semihost(0x18 /* SYS_EXIT */, (void *)0x20023 /* ADP_Stopped_RunTimeErrorUnknown */);
  for (;;) {
  }
}

et_status et_board_cmdline(char *buf, uint32_t len) {
  struct {
    char *buf;
    int32_t len;
  } block;
  if (buf == NULL || len < 2 || len > 0x7FFFFFFFu) return ET_E_ARG;
  block.buf = buf;
  block.len = (int32_t)(len - 1u);
  buf[0] = '\0';
  if (et_semihost(0x15 /* SYS_GET_CMDLINE */, &block) != 0) return ET_E_IO;
  buf[block.len >= 0 && (uint32_t)block.len < len ? (uint32_t)block.len : len - 1u] = '\0';
  return ET_OK;
}

/* newlib's heap: bounded by the linker script's heap region (rdimon's own _sbrk only stops at
 * the stack pointer, i.e. it would grow into the painted stack). */
void *_sbrk(ptrdiff_t incr) {
  static uint8_t *brk = NULL;
  uint8_t *prev;
  if (brk == NULL) brk = (uint8_t *)&__HeapBase;
  if (incr > (uint8_t *)&__HeapLimit - brk || incr < (uint8_t *)&__HeapBase - brk) {
    errno = ENOMEM;
    return (void *)-1;
  }
  prev = brk;
  brk += incr;
  return prev;
}
