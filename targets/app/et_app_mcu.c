/* edgetune-run on a Cortex-M board (the QEMU machines of targets/board): the arguments come from
 * the semihosting command line (QEMU -append "..."), files and the exit code go through newlib +
 * rdimon semihosting, ticks are SysTick (guest instructions under -icount shift=0), and the stack
 * is re-painted before every sample so its high-water mark is the step's own (runtime + model),
 * not newlib's file I/O between samples. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "et_app.h"
#include "et_board.h"

#ifndef ET_APP_CLOCK_HZ
#define ET_APP_CLOCK_HZ 25000000u /* the QEMU machines' SysTick clock (targets/<mcu>.json clock_hz) */
#endif
#define ET_APP_MAX_ARGS 16

extern uint32_t __StackLimit;
extern const uint32_t et_board_stack_paint;

/* Paint from 64 bytes above the stack's bottom (clear of the v7-M MPU guard and of v8-M's
 * MSPLIM reserve) up to just below this frame. */
static void et_mcu_stack_reset(void) {
  uintptr_t sp;
  volatile uint32_t *p = (volatile uint32_t *)((uintptr_t)&__StackLimit + 64u);
  __asm volatile("mov %0, sp" : "=r"(sp));
  while ((uintptr_t)p < sp - 64u) *p++ = et_board_stack_paint;
}

static uint32_t et_mcu_stack_used(void) {
  uint32_t used = 0;
  return et_board_stack_used(&used) == ET_OK ? used : 0u;
}

static void et_mcu_power_cut(void) {
  for (;;) { /* the host kills QEMU here: the power cut */
  }
}

int main(void) {
  static char line[512];
  static char *argv[ET_APP_MAX_ARGS];
  static et_io_stdio file;
  char err[96];
  et_app_options opt;
  et_app_hooks hooks;
  et_io io;
  int argc = 0, rc;
  char *tok;
  if (et_board_cmdline(line, sizeof line) != ET_OK) {
    printf("edgetune-run: error: no semihosting command line\n");
    return 2;
  }
  for (tok = strtok(line, " "); tok != NULL && argc < ET_APP_MAX_ARGS; tok = strtok(NULL, " ")) argv[argc++] = tok;
  if (et_app_parse(argc, argv, &opt, err, sizeof err) != ET_OK) {
    printf("edgetune-run: error: %s\nusage: fw.elf --stream=FILE [--results=FILE] [--state=FILE] "
           "[--summary=FILE] [--checkpoint=FILE [--resume [--fresh-ok]] [--save-every=N]] [--no-adapt] [--max=N]\n", err);
    return 2;
  }
  memset(&hooks, 0, sizeof hooks);
  et_board_clock_start();
  hooks.clock = et_board_ticks;
  hooks.clock_hz = ET_APP_CLOCK_HZ;
  hooks.stack_reset = et_mcu_stack_reset;
  hooks.stack_used = et_mcu_stack_used;
  et_board_stack_size(&hooks.stack_bytes);
  hooks.power_cut = et_mcu_power_cut;
  if (opt.checkpoint != NULL) {
    FILE *probe = fopen(opt.checkpoint, "rb");
    opt.checkpoint_found = probe != NULL ? 1u : 0u;
    if (probe != NULL) fclose(probe);
  }
  if (opt.checkpoint != NULL && et_io_stdio_open(&io, &file, opt.checkpoint) != ET_OK) {
    printf("edgetune-run: error: cannot open checkpoint %s\n", opt.checkpoint);
    return 1;
  }
  rc = et_app_run(&opt, &hooks, opt.checkpoint != NULL ? &io : NULL);
  if (opt.checkpoint != NULL && et_io_stdio_close(&file) != ET_OK && rc == 0) rc = 1;
  return rc;
}
